"""Fine-tunes a Hugging Face GPT-2 or Llama checkpoint with its blocks pipelined.

Takes every flag of train_lm.py (stages, micro-batches, schedule, partition, --auto,
checkpoints, ...) plus --hf_checkpoint, a local directory with config.json and
model.safetensors (or a sharded index). The model shape comes from the checkpoint: --model,
--num_layers and --vocab_size are refused.
Text (--data corpus.txt, a directory of text files, or the built-in text) is tokenized with
the checkpoint's own tokenizer.json (or --tokenizer), and the ids of --data are cached next to
it as corpus.txt.tok-<tokenizer hash>-<text hash>.npy; a checkpoint without tokenizer.json
trains on UTF-8 bytes (ids 0-255 of its vocabulary) with a warning. Token ids given as
--data ids.npy / ids.bin are used as they are.

    python experiments/finetune.py --hf_checkpoint path/to/gpt2 --data corpus.txt \
        --num_stages 4 --num_microbatches 8 --batch_size 16 --seq_len 256 --learning_rate 1e-4

The run keeps its tokenizer as WORKDIR/tokenizer.json, which `sample.py --workdir` uses.

Checkpoints land in --workdir as for train_lm.py; export the result with
`jaxpipe.hf.save_hf(cfg, jaxpipe.checkpoint.load_params(workdir)[1], out_dir)`.
"""

from __future__ import annotations

import os

import train_lm
from absl import flags

flags.DEFINE_string("hf_checkpoint", None, "Hugging Face checkpoint directory to start from.")
flags.mark_flag_as_required("hf_checkpoint")
flags.DEFINE_string("tokenizer", None, "tokenizer.json to use (default: the checkpoint's own).",
                    allow_override=True)


# The model's shape comes from the checkpoint: these train_lm.py flags would be ignored.
SHAPE_FLAGS = ("model", "num_layers", "vocab_size")


def main(argv):
    tokenizer = []  # set by initial(), which runs first

    def initial():
        from jaxpipe.config import ConfigError
        from jaxpipe.hf import load_hf
        from jaxpipe.tokenizer import checkpoint_tokenizer

        given = [f"--{name}" for name in SHAPE_FLAGS if flags.FLAGS[name].present]
        if given:
            raise ConfigError(
                f"{', '.join(given)} cannot change a Hugging Face checkpoint's shape; drop "
                f"{'them' if len(given) > 1 else 'it'} (the model comes from --hf_checkpoint)"
            )
        if not flags.FLAGS.hf_checkpoint:
            raise ConfigError("--hf_checkpoint is empty; pass a Hugging Face model directory")
        cfg, params = load_hf(flags.FLAGS.hf_checkpoint)
        tokenizer.append(
            checkpoint_tokenizer(flags.FLAGS.hf_checkpoint, cfg.vocab_size, flags.FLAGS.tokenizer)
        )
        return cfg, params

    def load(path):
        from jaxpipe.tokenizer import tokenize_data

        return tokenize_data(path, tokenizer[0])

    train_lm.main(argv, initial=initial, load=load)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jaxpipe imports jax
    from jaxpipe.cli import run_app

    run_app(main)
