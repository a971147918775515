"""Causal grouped-query attention kernels, chosen by `ModelConfig.attention`.

- "xla": `jax.nn.dot_product_attention` as XLA writes it; runs everywhere (the default).
- "cudnn": the same call with cuDNN's fused kernel (NVIDIA GPUs).
- "splash": the Pallas TPU splash-attention kernel shipped with JAX
  (`jax.experimental.pallas.ops.tpu.splash_attention`): a causal mask evaluated per block
  inside the kernel, blocks above the diagonal skipped, the `[T, T]` scores never stored; the
  G key/value heads are read by H / G query heads each, never repeated in memory. TPU only:
  on a TPU backend, or while `compiling_for("tpu")` (the deviceless compile of `jaxpipe.aot`).

The splash kernel is a Pallas call, which XLA's partitioner cannot split, so it runs per device:
inside a `shard_map` over the mesh axes not already manual where it is called (in the pipeline
executors, `data` splits the batch and `tensor` the heads; `pipe` is manual already). Its
gradient is the kernel's own backward (one fused dK/dV/dQ pass), wired in with a `custom_vjp`
around the per-device calls so that the cotangents leave the inner `shard_map` with the
inputs' types.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
from jax.sharding import PartitionSpec as P

from jaxpipe.config import ConfigError, ModelConfig
from jaxpipe.placement import free_axes

# The splash kernel tiles the sequence in blocks of a multiple of this many tokens.
SPLASH_TILE = 128
SPLASH_MAX_BLOCK = 512

_TARGET = contextvars.ContextVar("jaxpipe_attention_target", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
    """Within this context, programs are traced for `platform` ("tpu", "gpu", "cpu") whatever
    this process's backend: a deviceless compile for a TPU topology may use attention='splash'
    on a CPU host."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    """The platform programs are traced for: `compiling_for`'s, else JAX's default backend."""
    return _TARGET.get() or jax.default_backend()


# Kernels tied to one platform: (platform, what the kernel is, the alternatives to name).
_PLATFORM_KERNELS = {
    "cudnn": ("gpu", "needs an NVIDIA GPU", "'xla'"),
    "splash": ("tpu", "is the Pallas TPU kernel", "'xla' (or 'cudnn' on an NVIDIA GPU)"),
}


def check_kernel(cfg: ModelConfig, seq_len: int | None = None) -> None:
    """Raises naming the fix when the model's attention kernel cannot run on the platform
    programs are traced for (`target_platform`), or (splash) on `seq_len` tokens."""
    _check_platform(cfg.attention)
    if cfg.attention == "splash" and seq_len is not None:
        splash_block(seq_len)


def _check_platform(kernel: str) -> None:
    if kernel not in _PLATFORM_KERNELS or target_platform() == _PLATFORM_KERNELS[kernel][0]:
        return
    _, what, alternatives = _PLATFORM_KERNELS[kernel]
    raise ConfigError(
        f"attention={kernel!r} {what}, but this run's backend is {target_platform()}; use "
        f"attention={alternatives}"
    )


def causal_attention(cfg: ModelConfig, q_BTHK, k_BTGK, v_BTGK) -> jax.Array:
    """Causal grouped-query attention with the model's kernel; the G key/value heads are
    shared by H / G query heads each, never repeated in memory. Logits and softmax run in
    float32 whatever the compute dtype."""
    check_kernel(cfg, q_BTHK.shape[1])
    if cfg.attention == "splash":
        return splash_causal_attention(q_BTHK, k_BTGK, v_BTGK)
    return jax.nn.dot_product_attention(
        q_BTHK, k_BTGK, v_BTGK, is_causal=True, implementation=cfg.attention
    )


def splash_block(seq_len: int) -> int:
    """The splash kernel's block: the largest multiple of 128 up to 512 dividing `seq_len`;
    raises naming the fix when `seq_len` is not a multiple of 128."""
    if seq_len % SPLASH_TILE:
        raise ConfigError(
            f"attention='splash' needs a sequence length that is a multiple of {SPLASH_TILE}, "
            f"got {seq_len}; pad or cut the sequence to a multiple of {SPLASH_TILE}, or use "
            f"attention='xla'"
        )
    return max(b for b in range(SPLASH_TILE, SPLASH_MAX_BLOCK + 1, SPLASH_TILE)
               if seq_len % b == 0)


def splash_causal_attention(q_BTHK, k_BTGK, v_BTGK, *, interpret: bool = False) -> jax.Array:
    """Causal attention through the splash kernel, [B, T, H, K] in and out (the kernel itself
    works on [B, H, T, K]). `interpret` runs the kernel in Pallas' interpreter (any backend,
    slow: for checking the wiring on small shapes)."""
    if not interpret:
        _check_platform("splash")
    T, K = q_BTHK.shape[1], q_BTHK.shape[-1]
    splash_block(T)
    scale = jnp.asarray(1.0 / math.sqrt(K), q_BTHK.dtype)  # the kernel does not scale
    to_heads = lambda a: jnp.swapaxes(a, 1, 2)
    out_BHTK = _splash(interpret, to_heads(q_BTHK * scale), to_heads(k_BTGK), to_heads(v_BTGK))
    return to_heads(out_BHTK)


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, seq_len: int, interpret: bool):
    """The splash kernel for `heads` query heads of `seq_len` causal tokens (one sequence)."""
    b = splash_block(seq_len)
    sizes = splash.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b,
        block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        use_fused_bwd_kernel=True,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * heads)
    with jax.ensure_compile_time_eval():  # its block tables: constants, not one trace's values
        return splash.make_splash_mha(
            mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, save_residuals=True,
            interpret=interpret,
        )


def _forward_local(interpret, q_BHTK, k_BGTK, v_BGTK):
    """(out [B, H, T, K], log-sum-exp [B, H, T]) on this device's batch rows and heads."""
    kernel = _kernel(q_BHTK.shape[1], q_BHTK.shape[2], interpret)
    out, (lse,) = jax.vmap(kernel)(q_BHTK, k_BGTK, v_BGTK)
    return out, lse


def _backward_local(interpret, q_BHTK, k_BGTK, v_BGTK, out_BHTK, lse_BHT, dout_BHTK):
    """(dq, dk, dv) on this device's batch rows and heads: the kernel's own backward."""
    kernel = _kernel(q_BHTK.shape[1], q_BHTK.shape[2], interpret)
    kw = kernel.kwargs

    def one(q, k, v, out, lse, dout):
        res = (q, k, v, None, None, out, lse, kernel.dq_mask_info, kernel.dkv_mask_info)
        grads = splash_attention_kernel._splash_attention_bwd(
            False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None,
            kw["mask_function"], kw["attn_logits_soft_cap"], interpret, res, dout,
        )
        return grads[3:6]

    return jax.vmap(one)(q_BHTK, k_BGTK, v_BGTK, out_BHTK, lse_BHT, dout_BHTK)


def _per_device(fn, num_args: int, num_out: int):
    """`fn` on each device's block of [B, H, ...] arrays: a `shard_map` over the mesh axes that
    are not manual here, the batch on `data` and the heads on `tensor` (the pipeline's
    activation layout); `fn` itself outside any mesh."""
    free = free_axes()
    if all(n == 1 for n in free.values()):
        return fn
    spec = P("data" if "data" in free else None, "tensor" if "tensor" in free else None)
    return jax.shard_map(
        fn, in_specs=(spec,) * num_args, out_specs=(spec,) * num_out, axis_names=set(free),
        check_vma=False,
    )


def _varying(*arrays) -> frozenset:
    """The manual mesh axes any of `arrays` varies over."""
    return frozenset().union(*(jax.typeof(a).mat.varying for a in arrays))


def _vary(x, axes: frozenset):
    """`x` typed as varying over `axes` (what leaves the unchecked inner `shard_map` carries no
    such type; the pipeline's checks want the inputs' one back)."""
    missing = tuple(sorted(axes - jax.typeof(x).mat.varying))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _splash(interpret, q_BHTK, k_BGTK, v_BGTK):
    return _splash_fwd(interpret, q_BHTK, k_BGTK, v_BGTK)[0]


def _splash_fwd(interpret, q_BHTK, k_BGTK, v_BGTK):
    fwd = _per_device(functools.partial(_forward_local, interpret), 3, 2)
    axes = _varying(q_BHTK, k_BGTK, v_BGTK)
    out_BHTK, lse_BHT = (_vary(a, axes) for a in fwd(q_BHTK, k_BGTK, v_BGTK))
    return out_BHTK, (q_BHTK, k_BGTK, v_BGTK, out_BHTK, lse_BHT)


def _splash_bwd(interpret, res, dout_BHTK):
    bwd = _per_device(functools.partial(_backward_local, interpret), 6, 3)
    grads = bwd(*res, dout_BHTK)
    return tuple(_vary(g, _varying(x)) for g, x in zip(grads, res[:3], strict=True))


_splash.defvjp(_splash_fwd, _splash_bwd)
