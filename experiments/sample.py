"""Generates byte-level text from a checkpoint with the unpipelined reference model.

Run after `python experiments/train_lm.py --workdir runs/train_lm`:

    python experiments/sample.py --workdir runs/train_lm --prompt "def main(" --temperature 0

Expect: a few seconds on a 2-core CPU (one compile, then one forward pass per new token); the
`small` model after 300 steps continues Python-looking text (indentation, `self.`, `return`).
--temperature 0 is greedy; > 0 samples from softmax(logits / temperature) with --seed.

The params come from the newest verified checkpoint in WORKDIR/checkpoints, whatever pipeline
shape trained them. Tokens live in a fixed buffer of the model's max_seq_len, so the compiled
loop is reused for every prompt, length and temperature.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
from absl import flags, logging

_F = flags.FLAGS
flags.DEFINE_string("workdir", "runs/train_lm", "Training workdir holding checkpoints/.")
flags.DEFINE_string("prompt", "def ", "Text to continue.")
flags.DEFINE_integer("max_new_tokens", 64, "Bytes to generate (capped by max_seq_len).")
flags.DEFINE_float("temperature", 0.8, "0: greedy; > 0: sampling temperature.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest good one).")


@functools.cache
def _sampler(cfg):
    import jax
    import jax.numpy as jnp

    from jaxpipe import model as M

    def forward(params, buf_BT):
        x_BTD = M.embed_apply(cfg, params, buf_BT)
        x_BTD = M.stack_forward(cfg, params["blocks"], x_BTD)
        return M.head_apply(cfg, params, x_BTD)

    @jax.jit
    def run(params, buf_BT, start, end, temperature, key):
        def body(i, buf_BT):
            logits_V = forward(params, buf_BT)[0, i - 1].astype(jnp.float32)
            sampled = jax.random.categorical(
                jax.random.fold_in(key, i), logits_V / jnp.maximum(temperature, 1e-6)
            )
            tok = jnp.where(temperature > 0, sampled, jnp.argmax(logits_V))
            return buf_BT.at[0, i].set(tok.astype(buf_BT.dtype))

        return jax.lax.fori_loop(start, end, body, buf_BT)

    return run


def generate(
    cfg, params, prompt_ids, max_new_tokens: int, temperature: float = 0.0, seed: int = 0
) -> np.ndarray:
    """The ids that follow `prompt_ids` (at most max_seq_len - len(prompt) of them)."""
    import jax

    from jaxpipe.config import ConfigError

    n = len(prompt_ids)
    if n < 1 or n >= cfg.max_seq_len:
        raise ConfigError(
            f"the prompt is {n} tokens; it must be 1 to {cfg.max_seq_len - 1} (the model has "
            f"{cfg.max_seq_len} positions); shorten --prompt"
        )
    if temperature < 0 or not np.isfinite(temperature):
        raise ConfigError(f"temperature must be finite and >= 0, got {temperature}")
    end = min(cfg.max_seq_len, n + max_new_tokens)
    buf = np.zeros((1, cfg.max_seq_len), np.int32)
    buf[0, :n] = prompt_ids
    out = _sampler(cfg)(params, buf, n, end, np.float32(temperature), jax.random.key(seed))
    return np.asarray(out)[0, n:end]


def main(argv):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logging.set_verbosity(logging.WARNING)
    from jaxpipe.checkpoint import load_params
    from jaxpipe.config import ConfigError
    from jaxpipe.data import decode, encode

    del argv
    try:
        cfg, params = load_params(_F.workdir, _F.step)
        ids = generate(cfg, params, encode(_F.prompt), _F.max_new_tokens, _F.temperature, _F.seed)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(_F.prompt + decode(ids))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jaxpipe imports jax
    from jaxpipe.cli import run_app

    run_app(main)
