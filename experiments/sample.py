"""Generates byte-level text from a checkpoint with the unpipelined reference model.

Run after `python experiments/train_lm.py --workdir runs/train_lm`:

    python experiments/sample.py --workdir runs/train_lm --prompt "def main(" --temperature 0

Expect: a few seconds on a 2-core CPU (one compile, then one forward pass per new token); the
`small` model after 300 steps continues Python-looking text (indentation, `self.`, `return`).
--temperature 0 is greedy; > 0 samples from softmax(logits / temperature) with --seed, over
the --top_k most likely tokens when it is > 0.

The params come from the newest verified checkpoint in WORKDIR/checkpoints, whatever pipeline
shape trained them. Tokens live in a fixed buffer of the model's max_seq_len, so the compiled
loop is reused for every prompt, length and temperature.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
from absl import app, flags, logging

_F = flags.FLAGS
flags.DEFINE_string("workdir", "runs/train_lm", "Training workdir holding checkpoints/.")
flags.DEFINE_string("prompt", "def ", "Text to continue.")
flags.DEFINE_integer("max_new_tokens", 64, "Bytes to generate (capped, with a warning, by the "
                     "model's positions).")
flags.DEFINE_float("temperature", 0.8, "0: greedy; > 0: sampling temperature.")
flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens only (0: all).")
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
    def run(params, buf_BT, start, end, temperature, top_k, key):
        def body(i, buf_BT):
            logits_V = forward(params, buf_BT)[0, i - 1].astype(jnp.float32)
            # top_k > 0 keeps the k largest logits (and any tied with the k-th); 0 keeps all.
            kth = jnp.sort(logits_V)[logits_V.shape[0] - jnp.maximum(top_k, 1)]
            kept_V = jnp.where((top_k > 0) & (logits_V < kth), -jnp.inf, logits_V)
            sampled = jax.random.categorical(
                jax.random.fold_in(key, i), kept_V / jnp.maximum(temperature, 1e-6)
            )
            tok = jnp.where(temperature > 0, sampled, jnp.argmax(logits_V))
            return buf_BT.at[0, i].set(tok.astype(buf_BT.dtype))

        return jax.lax.fori_loop(start, end, body, buf_BT)

    return run


def check_sampling(max_new_tokens, temperature, seed, top_k: int = 0) -> None:
    """ConfigError naming the flag when a sampling setting cannot work."""
    from jaxpipe.config import ConfigError, check_seed, is_int

    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float, np.floating))
        or not np.isfinite(temperature)
        or temperature < 0
    ):
        raise ConfigError(f"temperature must be finite and >= 0 (0: greedy), got {temperature!r}")
    check_seed(seed)
    if not is_int(top_k) or top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0: no limit), got {top_k!r}")


def check_prompt(cfg, prompt_ids, max_new_tokens: int, top_k: int = 0) -> int:
    """The number of ids to generate (capped at the model's positions), or ConfigError."""
    from jaxpipe.config import ConfigError

    n = len(prompt_ids)
    if n < 1 or n >= cfg.max_seq_len:
        raise ConfigError(
            f"the prompt is {n} tokens; it must be 1 to {cfg.max_seq_len - 1} (the model has "
            f"{cfg.max_seq_len} positions); shorten --prompt"
        )
    top = int(np.max(prompt_ids))
    if top >= cfg.vocab_size or int(np.min(prompt_ids)) < 0:
        raise ConfigError(
            f"the prompt holds token id {top} but the model's vocabulary has ids 0 to "
            f"{cfg.vocab_size - 1}; --prompt is encoded as UTF-8 bytes, so use characters whose "
            f"bytes are below {cfg.vocab_size}"
        )
    if top_k > cfg.vocab_size:
        raise ConfigError(
            f"top_k {top_k} exceeds the model's vocabulary of {cfg.vocab_size} ids; pass "
            f"--top_k <= {cfg.vocab_size}, or 0 for no limit"
        )
    return min(max_new_tokens, cfg.max_seq_len - n)


def generate(
    cfg,
    params,
    prompt_ids,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    top_k: int = 0,
) -> np.ndarray:
    """The ids that follow `prompt_ids` (at most max_seq_len - len(prompt) of them), sampled
    from the `top_k` most likely (0: all) at `temperature` (0: greedy)."""
    import jax

    prompt_ids = np.asarray(prompt_ids)
    n = len(prompt_ids)
    check_sampling(max_new_tokens, temperature, seed, top_k)
    end = n + check_prompt(cfg, prompt_ids, max_new_tokens, top_k)
    buf = np.zeros((1, cfg.max_seq_len), np.int32)
    buf[0, :n] = prompt_ids
    out = _sampler(cfg)(
        params, buf, n, end, np.float32(temperature), np.int32(top_k), jax.random.key(seed)
    )
    return np.asarray(out)[0, n:end]


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
    from jaxpipe.data import BYTE_VOCAB, decode, encode

    try:
        if len(argv) > 1:
            raise ConfigError(f"unexpected arguments {argv[1:]}; flags are spelled --name=value")
        prompt = encode(_F.prompt)
        check_sampling(_F.max_new_tokens, _F.temperature, _F.seed, _F.top_k)
        cfg, params = load(_F.workdir, _F.step)
        count = check_prompt(cfg, prompt, _F.max_new_tokens, _F.top_k)
        if count < _F.max_new_tokens:
            print(
                f"warning: generating {count} tokens, not --max_new_tokens {_F.max_new_tokens}: "
                f"the model has {cfg.max_seq_len} positions and the prompt takes {len(prompt)}",
                file=sys.stderr,
            )
        ids = generate(cfg, params, prompt, count, _F.temperature, _F.seed, _F.top_k)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if len(ids) and int(np.max(ids)) >= BYTE_VOCAB:  # e.g. a fine-tuned Hugging Face model
        print(
            "warning: the model generated token ids above 255, which are not bytes; printing "
            "the generated ids (decode them with the checkpoint's tokenizer)",
            file=sys.stderr,
        )
        print(_F.prompt)
        print(" ".join(str(int(i)) for i in ids))
        return
    print(_F.prompt + decode(ids))


if __name__ == "__main__":
    app.run(main)
