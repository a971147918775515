"""The attention kernels: `jax.nn.dot_product_attention` against explicit softmax attention, and
the splash kernel's wiring (its Pallas interpreter on CPU) against it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpipe import attention as A
from jaxpipe import model as M
from jaxpipe.checkpoint import check_model
from jaxpipe.config import ConfigError, PipelineConfig, get_preset
from jaxpipe.mesh import make_mesh


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
    got = A.causal_attention(cfg, q, k, v)
    np.testing.assert_allclose(got, _explicit(q, k, v), atol=1e-5, rtol=1e-5)
    # A later query never changes an earlier output (causality).
    q2 = q.at[:, -1].set(0.0)
    np.testing.assert_array_equal(A.causal_attention(cfg, q2, k, v)[:, :-1], got[:, :-1])
    loss = lambda f: lambda *a: jnp.vdot(f(*a), cot)
    g_got = jax.grad(loss(lambda *a: A.causal_attention(cfg, *a)), (0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(_explicit), (0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_cudnn_kernel_off_gpu_is_a_clear_error():
    cfg = get_preset("tiny", attention="cudnn")
    x = jnp.zeros((1, 4, 4, 8))
    with pytest.raises(ConfigError, match="attention='cudnn' needs an NVIDIA GPU.*'xla'"):
        A.causal_attention(cfg, x, x, x)


def test_splash_off_tpu_and_bad_lengths_are_clear_errors():
    cfg = get_preset("tiny", attention="splash")
    x = jnp.zeros((1, 128, 4, 8))
    with pytest.raises(ConfigError, match="attention='splash' is the Pallas TPU kernel, but "
                       "this run's backend is cpu; use attention='xla'"):
        A.causal_attention(cfg, x, x, x)
    # Compiling for a TPU topology (as `aot.compile_step` does), the kernel is allowed; the
    # length must still tile by 128.
    with A.compiling_for("tpu"), pytest.raises(ConfigError, match="multiple of 128, got 100"):
        A.causal_attention(cfg, x[:, :100], x[:, :100], x[:, :100])
    assert A.target_platform() == "cpu"
    assert [A.splash_block(t) for t in (128, 384, 640, 1024, 4096)] == [128, 384, 128, 512, 512]


@pytest.mark.slow
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_splash_wiring_equals_xla_inside_the_pipeline_layout(heads, kv_heads):
    """The splash kernel (Pallas' interpreter on CPU) called as the pipeline calls it: inside a
    `shard_map` manual over `pipe`, batch on `data` and heads on `tensor` (Auto axes), so it runs
    per device in a nested `shard_map`; values and gradients equal XLA's attention. (The typed
    `pipe` variance the real executors check is covered by the TPU compile in test_aot.py.)"""
    mesh = make_mesh(PipelineConfig(num_stages=2, data_parallel=2, tensor_parallel=2))
    B, T, K = 4, 128, 8
    kq, kk, kv, kc = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(kq, (2, B, T, heads, K))
    k = jax.random.normal(kk, (2, B, T, kv_heads, K))
    v = jax.random.normal(kv, (2, B, T, kv_heads, K))
    cot = jax.random.normal(kc, (2, B, T, heads, K))

    def staged(attend):
        def loss(q, k, v):
            out = jax.shard_map(
                lambda q, k, v: attend(q[0], k[0], v[0])[None], mesh=mesh,
                in_specs=(P("pipe"),) * 3, out_specs=P("pipe"), axis_names={"pipe"},
                check_vma=False,  # Pallas' interpreter loops do not type their carries
            )(q, k, v)
            return jnp.vdot(out, cot), out
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))

    on = NamedSharding(mesh, P("pipe", "data", None, "tensor"))
    args = [jax.device_put(a, on) for a in (q, k, v)]
    (_, got), g_got = staged(lambda *a: A.splash_causal_attention(*a, interpret=True))(*args)
    (_, ref), g_ref = staged(lambda *a: jax.nn.dot_product_attention(*a, is_causal=True))(*args)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[0], _explicit(q[0], k[0], v[0]), atol=1e-5, rtol=1e-5)
    for a, b in zip(g_got, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_unknown_kernel_and_checkpoints_across_kernels():
    with pytest.raises(ConfigError, match="unknown attention kernel 'flash'; choose one of"):
        get_preset("tiny", attention="flash")
    # The kernel changes no parameter: a checkpoint restores under another one.
    check_model(get_preset("tiny"), get_preset("tiny", attention="cudnn"), "ckpt")
    check_model(get_preset("tiny"), get_preset("tiny", attention="splash"), "ckpt")
    with pytest.raises(ConfigError, match="d_model"):
        check_model(get_preset("tiny"), get_preset("tiny", d_model=64), "ckpt")


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_a_lean_block_keeps_no_scores_and_the_same_gradients(preset):
    """A lean block's backward recomputes attention's scores and softmax, the norms' statistics
    and the activation's internals: it saves no [T, T] array and well under half of what plain
    autodiff saves, for the same gradients."""
    cfg = get_preset(preset)
    T = 24  # not a weight's dimension
    p = jax.tree.map(lambda a: a[0], M.init_params(cfg, seed=1)["blocks"])
    x = jax.random.normal(jax.random.key(2), (2, T, cfg.d_model))

    def saved(lean):
        res = saved_residuals(lambda p, x: M.block_apply(cfg, p, x, lean), p, x)
        return [a.shape for a, _ in res], sum(a.size * a.dtype.itemsize for a, _ in res)

    (lean_shapes, lean_bytes), (_, plain_bytes) = saved(True), saved(False)
    assert not [s for s in lean_shapes if s[-2:] == (T, T)], lean_shapes
    assert lean_bytes < 0.5 * plain_bytes, (lean_bytes, plain_bytes)
    grads = [
        jax.grad(lambda p, x, lean=lean: jnp.sum(M.block_apply(cfg, p, x, lean) ** 2), (0, 1))(p, x)
        for lean in (True, False)
    ]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)
