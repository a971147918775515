"""Text generation with the unpipelined model: a prefill, then one-token steps on a KV cache.

`generate` runs the prompt once through every block, keeping each layer's keys and values in a
cache of the model's max_seq_len positions, then produces one token per step from the cache:
a step costs one token's work instead of a whole sequence's. The prefill is compiled once per
prompt length and the decode loop once per model (its trip count and position are traced).
`generate_uncached` re-runs the whole sequence for every token (a reference for tests and
benchmarks). Greedy output is the same token for token.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe import model as M
from jaxpipe.config import ConfigError, ModelConfig, check_seed, is_int


def check_sampling(max_new_tokens, temperature, seed, top_k=0) -> None:
    """ConfigError naming the setting when a sampling option cannot work."""
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ConfigError(f"temperature must be finite and >= 0 (0: greedy), got {temperature!r}")
    check_seed(seed)
    if not is_int(top_k) or top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0: no limit), got {top_k!r}")


def check_prompt(cfg: ModelConfig, prompt_ids, max_new_tokens: int, top_k: int = 0) -> int:
    """How many ids follow the prompt (max_new_tokens, capped at the model's positions), or
    ConfigError when the prompt or top_k cannot work with this model."""
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


def _checked_prompt(cfg, prompt_ids, max_new_tokens, temperature, top_k, seed):
    """(prompt as int32 ids, position after the last generated token), or ConfigError."""
    prompt = np.asarray(prompt_ids, np.int64).reshape(-1)
    check_sampling(max_new_tokens, temperature, seed, top_k)
    end = len(prompt) + check_prompt(cfg, prompt, max_new_tokens, top_k)
    return prompt.astype(np.int32), end


def _pick(logits_V, temperature, top_k, key):
    """Greedy at temperature 0; else a sample of softmax(logits / temperature) over the top_k
    logits (all of them when top_k is 0)."""
    logits_V = logits_V.astype(jnp.float32)
    V = logits_V.shape[-1]
    kth = jnp.sort(logits_V)[V - jnp.clip(top_k, 1, V)]
    kept = jnp.where((top_k > 0) & (logits_V < kth), -jnp.inf, logits_V)
    sampled = jax.random.categorical(key, kept / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits_V)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(cfg: ModelConfig, params, prompt_1N):
    L, S, G, K = cfg.num_layers, cfg.max_seq_len, cfg.kv_heads, cfg.head_dim
    zeros = jnp.zeros((L, 1, S, G, K), jnp.dtype(cfg.dtype))
    x = M.embed_apply(cfg, params, prompt_1N)
    x, cache = M.stack_decode(cfg, params["blocks"], x, (zeros, zeros), 0)
    return M.head_apply(cfg, params, x[:, -1:])[0, 0], cache


@functools.partial(jax.jit, static_argnums=0)
def _decode(cfg: ModelConfig, params, logits_V, cache, buf_S, start, end, temperature, top_k, key):
    """Picks tokens for positions start..end - 1 into buf_S, one cached step each."""

    def step(i, carry):
        logits_V, cache, buf_S = carry
        tok = _pick(logits_V, temperature, top_k, jax.random.fold_in(key, i))
        buf_S = buf_S.at[i].set(tok)
        x = M.embed_apply(cfg, params, tok[None, None], i)
        x, cache = M.stack_decode(cfg, params["blocks"], x, cache, i)
        return M.head_apply(cfg, params, x)[0, 0], cache, buf_S

    return jax.lax.fori_loop(start, end, step, (logits_V, cache, buf_S))[2]


def generate(
    cfg: ModelConfig,
    params,
    prompt_ids,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """The ids that follow `prompt_ids` (at most max_seq_len - len(prompt) of them).

    Args:
      cfg, params: the model and its canonical parameters (e.g. `checkpoint.load_params`).
      prompt_ids: 1 to max_seq_len - 1 token ids.
      max_new_tokens: tokens to produce (fewer when the model's positions run out).
      temperature: 0 is greedy; > 0 samples from softmax(logits / temperature).
      top_k: sample among the k most likely tokens only (0: all).
      seed: the sampling seed; token i draws from fold_in(key(seed), i).
    """
    prompt, end = _checked_prompt(cfg, prompt_ids, max_new_tokens, temperature, top_k, seed)
    n = len(prompt)
    logits, cache = _prefill(cfg, params, jnp.asarray(prompt)[None])
    buf = jnp.zeros((cfg.max_seq_len,), jnp.int32)
    out = _decode(
        cfg,
        params,
        logits,
        cache,
        buf,
        n,
        end,
        np.float32(temperature),
        np.int32(top_k),
        jax.random.key(seed),
    )
    return np.asarray(out)[n:end]


@functools.partial(jax.jit, static_argnums=0)
def _uncached(cfg: ModelConfig, params, buf_1S, start, end, temperature, top_k, key):
    def step(i, buf_1S):
        x = M.embed_apply(cfg, params, buf_1S)
        x = M.stack_forward(cfg, params["blocks"], x)
        logits_V = M.head_apply(cfg, params, x)[0, i - 1]
        tok = _pick(logits_V, temperature, top_k, jax.random.fold_in(key, i))
        return buf_1S.at[0, i].set(tok)

    return jax.lax.fori_loop(start, end, step, buf_1S)


def generate_uncached(
    cfg: ModelConfig,
    params,
    prompt_ids,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """`generate` without a cache: every token re-runs the model over all max_seq_len positions
    (causal attention keeps the unused tail out of the result)."""
    prompt, end = _checked_prompt(cfg, prompt_ids, max_new_tokens, temperature, top_k, seed)
    n = len(prompt)
    buf = np.zeros((1, cfg.max_seq_len), np.int32)
    buf[0, :n] = prompt
    out = _uncached(
        cfg, params, buf, n, end, np.float32(temperature), np.int32(top_k), jax.random.key(seed)
    )
    return np.asarray(out)[0, n:end]
