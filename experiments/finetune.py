"""Fine-tunes a Hugging Face GPT-2 or Llama checkpoint with its blocks pipelined.

Takes every flag of train_lm.py (stages, micro-batches, schedule, partition, checkpoints, ...)
plus --hf_checkpoint, a local directory with config.json and model.safetensors (or a sharded
index). The model shape comes from the checkpoint: --model, --num_layers and --vocab_size are
refused.
Give token ids of the checkpoint's own tokenizer with --data ids.npy / ids.bin; byte-level
text (the default data) also runs, as ids 0-255 of the checkpoint's vocabulary.

    python experiments/finetune.py --hf_checkpoint path/to/gpt2 --data ids.npy \
        --num_stages 4 --num_microbatches 8 --batch_size 16 --seq_len 256 --learning_rate 1e-4

Checkpoints land in --workdir as for train_lm.py; export the result with
`jaxpipe.hf.save_hf(cfg, jaxpipe.checkpoint.load_params(workdir)[1], out_dir)`.
"""

from __future__ import annotations

import os

import train_lm
from absl import flags

flags.DEFINE_string("hf_checkpoint", None, "Hugging Face checkpoint directory to start from.")
flags.mark_flag_as_required("hf_checkpoint")


# The model's shape comes from the checkpoint: these train_lm.py flags would be ignored.
SHAPE_FLAGS = ("model", "num_layers", "vocab_size")


def main(argv):
    def initial():
        from jaxpipe.config import ConfigError
        from jaxpipe.hf import load_hf

        given = [f"--{name}" for name in SHAPE_FLAGS if flags.FLAGS[name].present]
        if given:
            raise ConfigError(
                f"{', '.join(given)} cannot change a Hugging Face checkpoint's shape; drop "
                f"{'them' if len(given) > 1 else 'it'} (the model comes from --hf_checkpoint)"
            )
        if not flags.FLAGS.hf_checkpoint:
            raise ConfigError("--hf_checkpoint is empty; pass a Hugging Face model directory")
        return load_hf(flags.FLAGS.hf_checkpoint)

    train_lm.main(argv, initial=initial)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jaxpipe imports jax
    from jaxpipe.cli import run_app

    run_app(main)
