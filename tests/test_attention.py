"""The attention kernel: `jax.nn.dot_product_attention` against explicit softmax attention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpipe import model as M
from jaxpipe.checkpoint import check_model
from jaxpipe.config import ConfigError, get_preset


def _explicit(q_BTHK, k_BTGK, v_BTGK):
    """Causal attention written out: [B, G, H/G, T, T] float32 scores, masked softmax."""
    B, T, H, K = q_BTHK.shape
    G = k_BTGK.shape[2]
    q = q_BTHK.reshape(B, T, G, H // G, K)
    logits = jnp.einsum("btgrk,bsgk->bgrts", q, k_BTGK).astype(jnp.float32) / math.sqrt(K)
    logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q_BTHK.dtype)
    return jnp.einsum("bgrts,bsgk->btgrk", probs, v_BTGK).reshape(B, T, H, K)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_kernel_equals_explicit_attention_values_and_gradients(heads, kv_heads):
    cfg = get_preset("tiny-llama", num_heads=heads, num_kv_heads=kv_heads)
    B, T, K = 2, 12, 8
    kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (B, T, heads, K))
    k = jax.random.normal(kk, (B, T, kv_heads, K))
    v = jax.random.normal(kv, (B, T, kv_heads, K))
    cot = jax.random.normal(kc, (B, T, heads, K))
    got = M.causal_attention(cfg, q, k, v)
    np.testing.assert_allclose(got, _explicit(q, k, v), atol=1e-5, rtol=1e-5)
    # A later query never changes an earlier output (causality).
    q2 = q.at[:, -1].set(0.0)
    np.testing.assert_array_equal(M.causal_attention(cfg, q2, k, v)[:, :-1], got[:, :-1])
    loss = lambda f: lambda *a: jnp.vdot(f(*a), cot)
    g_got = jax.grad(loss(lambda *a: M.causal_attention(cfg, *a)), (0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(_explicit), (0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_cudnn_kernel_off_gpu_is_a_clear_error():
    cfg = get_preset("tiny", attention="cudnn")
    x = jnp.zeros((1, 4, 4, 8))
    with pytest.raises(ConfigError, match="attention='cudnn' needs an NVIDIA GPU.*'xla'"):
        M.causal_attention(cfg, x, x, x)


def test_unknown_kernel_and_checkpoints_across_kernels():
    with pytest.raises(ConfigError, match="unknown attention kernel 'flash'; choose one of"):
        get_preset("tiny", attention="flash")
    # The kernel changes no parameter: a checkpoint restores under another one.
    check_model(get_preset("tiny"), get_preset("tiny", attention="cudnn"), "ckpt")
    with pytest.raises(ConfigError, match="d_model"):
        check_model(get_preset("tiny"), get_preset("tiny", d_model=64), "ckpt")
