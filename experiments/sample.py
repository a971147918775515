"""Generates text from a checkpoint with the unpipelined model and a KV cache.

Run after `python experiments/train_lm.py --workdir runs/train_lm`:

    python experiments/sample.py --workdir runs/train_lm --prompt "def main(" --temperature 0

Expect: a few seconds on a 2-core CPU (two compiles, then one cached step per new token); the
`small` model after 300 steps continues Python-looking text (indentation, `self.`, `return`).
--temperature 0 is greedy; > 0 samples from softmax(logits / temperature) with --seed, over
the --top_k most likely tokens when it is > 0.

The params come from the newest verified checkpoint in WORKDIR/checkpoints (or --step), whatever
pipeline shape trained them; generation is `jaxpipe.sampling.generate`. The prompt is encoded and
the output decoded with the run's tokenizer (WORKDIR/tokenizer.json, which finetune.py keeps
there; --tokenizer overrides it), or as UTF-8 bytes when the run has none.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

_F = flags.FLAGS
# --workdir and --seed mean the same as train_lm.py's (same defaults): either definition may
# stand when both scripts are imported into one process (the tests do).
flags.DEFINE_string("workdir", "runs/train_lm", "Training workdir holding checkpoints/.",
                    allow_override=True)
flags.DEFINE_string("prompt", "def ", "Text to continue.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate (capped, with a warning, by the "
                     "model's positions).")
flags.DEFINE_float("temperature", 0.8, "0: greedy; > 0: sampling temperature.")
flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens only (0: all).")
flags.DEFINE_integer("seed", 0, "Sampling seed.", allow_override=True)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest good one).")
flags.DEFINE_string("tokenizer", None, "tokenizer.json to encode and decode with (default: the "
                    "run's WORKDIR/tokenizer.json, else UTF-8 bytes).", allow_override=True)


def load(workdir: str, step: int | None):
    """(ModelConfig, params) of `step` (default: the newest good one); ConfigError naming the
    available steps when `step` is missing or unreadable."""
    from jaxpipe.checkpoint import Checkpoints, CorruptCheckpoint, load_params
    from jaxpipe.config import ConfigError

    try:
        return load_params(workdir, step)
    except CorruptCheckpoint as e:  # only an explicit step raises it
        with Checkpoints(workdir, read_only=True) as ckpts:
            steps = ckpts.steps()
            where = ckpts.directory
        if step not in steps:
            raise ConfigError(
                f"no checkpoint for --step {step} in {where}; available steps: {steps} (or omit "
                f"--step for the newest good one)"
            ) from None
        raise ConfigError(
            f"checkpoint {where / str(step)} cannot be used ({e}); pick another --step from "
            f"{steps} or omit --step"
        ) from None


def main(argv):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logging.set_verbosity(logging.WARNING)
    from jaxpipe.config import ConfigError
    from jaxpipe.sampling import check_prompt, check_sampling, generate
    from jaxpipe.tokenizer import ByteTokenizer, check_vocab, run_tokenizer
    from jaxpipe.workdir import check_run_dir

    try:
        if len(argv) > 1:
            raise ConfigError(f"unexpected arguments {argv[1:]}; flags are spelled --name=value")
        check_sampling(_F.max_new_tokens, _F.temperature, _F.seed, _F.top_k)
        workdir = check_run_dir(_F.workdir)
        tok = run_tokenizer(workdir, _F.tokenizer)
        prompt = tok.encode(_F.prompt)
        cfg, params = load(workdir, _F.step)
        if not isinstance(tok, ByteTokenizer):  # bytes: check_prompt checks the ids
            check_vocab(tok, cfg.vocab_size)
        count = check_prompt(cfg, prompt, _F.max_new_tokens, _F.top_k)
        if count < _F.max_new_tokens:
            print(
                f"warning: generating {count} tokens, not --max_new_tokens {_F.max_new_tokens}: "
                f"the model has {cfg.max_seq_len} positions and the prompt takes {len(prompt)}",
                file=sys.stderr,
            )
        ids = generate(cfg, params, prompt, count, _F.temperature, _F.top_k, _F.seed)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    unknown = tok.unknown(ids)
    if unknown:  # e.g. a fine-tuned Hugging Face model sampled as bytes, or a padded vocabulary
        if isinstance(tok, ByteTokenizer):
            why = ("token ids above 255, which are not bytes; printing the generated ids (decode "
                   "them with the checkpoint's tokenizer, or pass --tokenizer)")
        else:
            why = (f"token ids the tokenizer {tok.describe()} does not have ({unknown[:5]}); "
                   f"printing the generated ids")
        print(f"warning: the model generated {why}", file=sys.stderr)
        print(_F.prompt)
        print(" ".join(str(int(i)) for i in ids))
        return
    print(_F.prompt + tok.decode(ids))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jaxpipe imports jax
    from jaxpipe.cli import run_app

    run_app(main)
