"""Flax decoder-only transformer with stacked blocks, and its unpipelined reference forward.

Parameters are a dict {"embed": ..., "blocks": ..., "head": ...}; every leaf of "blocks" carries
a leading `layers` axis (the canonical layout; see `layout.py` for the pipeline view).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxpipe.attention import causal_attention
from jaxpipe.config import (
    ALLOCATION_GUARD_PARAMS,
    ConfigError,
    ModelConfig,
    check_seed,
    is_int,
)
from jaxpipe.placement import free_axes

_INIT_STD = 0.02


# A lean block (`Block.lean`) keeps only the inputs of its norms, elementwise activations and
# XLA attention for the backward, which recomputes the rest from them: the norms' statistics,
# the activations' internals (the tanh GELU alone would save five more [B, T, F] tensors) and
# attention's scores and softmax (three [B, H, T, T] tensors), as fused attention kernels do.
_LEAN_NORMS = {"gpt2": nn.remat(nn.LayerNorm), "llama": nn.remat(nn.RMSNorm)}
_NORMS = {"gpt2": nn.LayerNorm, "llama": nn.RMSNorm}
_gelu = functools.partial(jax.nn.gelu, approximate=True)
_swiglu = lambda gate, up: jax.nn.silu(gate) * up


def _norm(cfg: ModelConfig, name: str, lean: bool = False) -> nn.Module:
    norm = (_LEAN_NORMS if lean else _NORMS)[cfg.style]
    return norm(epsilon=cfg.norm_eps, dtype=jnp.float32, name=name)


def _lean(fn, lean: bool):
    return jax.checkpoint(fn) if lean else fn


# The values a lean block keeps, named: the inputs of its matmuls' weight gradients (norm
# outputs, attention output, MLP activation), attention's q, k, v, the MLP's pre-activations
# and the residual stream between attention and MLP. A caller that checkpoints the block with
# its own policy saves just these with `KEEP_POLICY` (the block's input is the caller's).
KEEP = "lean_block_keeps"
KEEP_POLICY = jax.checkpoint_policies.save_only_these_names(KEEP)


def _keep(x, lean: bool):
    return checkpoint_name(x, KEEP) if lean else x


def rope(x_BTHK: jax.Array, theta: float, start=0) -> jax.Array:
    """Rotary position embedding (half-split convention, as in Hugging Face Llama) of tokens at
    positions start, start + 1, ..."""
    T, K = x_BTHK.shape[1], x_BTHK.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K)
    pos_T = start + jnp.arange(T, dtype=jnp.float32)
    angle_TK = pos_T[:, None] * inv_freq[None, :]
    angle_TK = jnp.concatenate([angle_TK, angle_TK], axis=-1)
    cos, sin = jnp.cos(angle_TK)[:, None, :], jnp.sin(angle_TK)[:, None, :]
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x_BTHK * cos + rotated * sin).astype(x_BTHK.dtype)


class Attention(nn.Module):
    """Causal self-attention. With `cache` (keys and values [B, S, G, K] of S positions) the
    T tokens sit at positions start..start + T - 1: their keys and values are written into the
    cache, they attend to every cached position up to their own, and (out, cache) is returned."""

    cfg: ModelConfig
    lean: bool = False

    @nn.compact
    def __call__(self, x_BTD, cache=None, start=0):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        H, G, K = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        bias = cfg.style == "gpt2"
        dense = lambda n, name: nn.Dense(
            n, use_bias=bias, dtype=dt, kernel_init=nn.initializers.normal(_INIT_STD), name=name
        )
        B, T, _ = x_BTD.shape
        q_BTHK = dense(H * K, "q")(x_BTD).reshape(B, T, H, K)
        k_BTGK = dense(G * K, "k")(x_BTD).reshape(B, T, G, K)
        v_BTGK = dense(G * K, "v")(x_BTD).reshape(B, T, G, K)
        if cfg.style == "llama":
            q_BTHK = rope(q_BTHK, cfg.rope_theta, start)
            k_BTGK = rope(k_BTGK, cfg.rope_theta, start)
        if cache is None:
            # Fused kernels choose their own residuals; XLA's are recomputed when lean.
            attention = functools.partial(causal_attention, cfg)
            attention = _lean(attention, self.lean and cfg.attention == "xla")
            q_BTHK, k_BTGK, v_BTGK = (_keep(a, self.lean) for a in (q_BTHK, k_BTGK, v_BTGK))
            out_BTHK = _keep(attention(q_BTHK, k_BTGK, v_BTGK), self.lean)
        else:
            k_BSGK, v_BSGK = (
                jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), start, axis=1)
                for c, new in zip(cache, (k_BTGK, v_BTGK), strict=True)
            )
            cache = (k_BSGK, v_BSGK)
            S = k_BSGK.shape[1]
            seen_TS = jnp.arange(S)[None, :] <= start + jnp.arange(T)[:, None]
            out_BTHK = jax.nn.dot_product_attention(
                q_BTHK, k_BSGK.astype(dt), v_BSGK.astype(dt), mask=seen_TS[None, None]
            )
        out_init = nn.initializers.normal(_INIT_STD / math.sqrt(2 * cfg.num_layers))
        out = nn.Dense(cfg.d_model, use_bias=bias, dtype=dt, kernel_init=out_init, name="o")(
            out_BTHK.reshape(B, T, H * K)
        )
        return out if cache is None else (out, cache)


class Mlp(nn.Module):
    cfg: ModelConfig
    lean: bool = False

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        init = nn.initializers.normal(_INIT_STD)
        out_init = nn.initializers.normal(_INIT_STD / math.sqrt(2 * cfg.num_layers))
        if cfg.style == "gpt2":
            h_BTF = nn.Dense(cfg.ff_dim, dtype=dt, kernel_init=init, name="up")(x_BTD)
            h_BTF = _keep(_lean(_gelu, self.lean)(_keep(h_BTF, self.lean)), self.lean)
            return nn.Dense(cfg.d_model, dtype=dt, kernel_init=out_init, name="down")(h_BTF)
        gate = nn.Dense(cfg.ff_dim, use_bias=False, dtype=dt, kernel_init=init, name="gate")
        up = nn.Dense(cfg.ff_dim, use_bias=False, dtype=dt, kernel_init=init, name="up")
        gate_BTF, up_BTF = (_keep(a, self.lean) for a in (gate(x_BTD), up(x_BTD)))
        h_BTF = _keep(_lean(_swiglu, self.lean)(gate_BTF, up_BTF), self.lean)
        down = nn.Dense(cfg.d_model, use_bias=False, dtype=dt, kernel_init=out_init, name="down")
        return down(h_BTF)


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(.)). With a key/value
    `cache` (see `Attention`) it returns (x, cache). A `lean` block keeps fewer values for its
    backward and recomputes the rest (see `_lean`); a block recomputed whole (remat) is not lean,
    or its backward would recompute attention a second time."""

    cfg: ModelConfig
    lean: bool = False

    @nn.compact
    def __call__(self, x_BTD, cache=None, start=0):
        dt = jnp.dtype(self.cfg.dtype)
        lean = self.lean
        h = _keep(_norm(self.cfg, "attn_norm", lean)(x_BTD).astype(dt), lean)
        attn = Attention(self.cfg, lean, name="attn")(h, cache, start)
        if cache is not None:
            attn, cache = attn
        x_BTD = _keep(x_BTD + attn, lean)
        h = _keep(_norm(self.cfg, "mlp_norm", lean)(x_BTD).astype(dt), lean)
        x_BTD = x_BTD + Mlp(self.cfg, lean, name="mlp")(h)
        return x_BTD if cache is None else (x_BTD, cache)


def vocab_lookup(table_VD, tokens_BT):
    """Rows of the token table. Where the mesh's `tensor` axis is free here (not manual) and
    splits the rows, the lookup is Megatron's vocabulary-parallel one: the table viewed as
    [tensor, V / tensor, D], every slice looks up each token's row within it, the rows of the
    slices that do not hold the token are zeroed, and a sum over the slices (one all-reduce
    over `tensor`) combines them. Exact (one non-zero term per token). The gather then runs
    along the slices' own rows, so no device needs another's rows (libtpu's partitioner
    aborts on a plain gather from the split table inside the pipeline's `pipe`-manual region)."""
    tp = free_axes().get("tensor", 1)
    V, D = table_VD.shape
    if tp == 1 or V % tp:
        return jnp.take(table_VD, tokens_BT, axis=0)
    rows = V // tp
    table_PRD = table_VD.reshape(tp, rows, D)
    x_PBTD = jnp.take(table_PRD, tokens_BT % rows, axis=1)
    hit_PBT = ((tokens_BT // rows)[None] == jnp.arange(tp)[:, None, None]).astype(x_PBTD.dtype)
    # A contraction rather than a select: its backward keeps the [tensor, B, T] mask, not one
    # broadcast to every feature.
    return jnp.einsum("pbt,pbtd->btd", hit_PBT, x_PBTD)


class Embed(nn.Module):
    cfg: ModelConfig
    rows: int = 0  # rows of the token table: the vocabulary, padded (see `pad_vocab`); 0: V

    @nn.compact
    def __call__(self, tokens_BT, start=0):
        cfg = self.cfg
        shape = (self.rows or cfg.vocab_size, cfg.d_model)
        table = self.param("tok", nn.initializers.normal(_INIT_STD), shape)
        x_BTD = vocab_lookup(table, tokens_BT)
        if cfg.style == "gpt2":  # learned positions start, start + 1, ...
            pos = self.param("pos", nn.initializers.normal(0.01), (cfg.max_seq_len, cfg.d_model))
            T = tokens_BT.shape[1]
            x_BTD = x_BTD + jax.lax.dynamic_slice_in_dim(pos, start, T)[None]
        return x_BTD.astype(jnp.dtype(cfg.dtype))


class Head(nn.Module):
    """Final norm and the projection to vocabulary logits (tied to the embedding or not)."""

    cfg: ModelConfig
    rows: int = 0  # logits per token: the vocabulary, padded (see `pad_vocab`); 0: V

    @nn.compact
    def __call__(self, x_BTD, tok_table_VD=None):
        cfg = self.cfg
        h_BTD = _norm(cfg, "norm")(x_BTD).astype(jnp.dtype(cfg.dtype))
        if cfg.tied:
            return _mask_padding(cfg, jnp.einsum("btd,vd->btv", h_BTD,
                                                 tok_table_VD.astype(h_BTD.dtype)))
        out = nn.Dense(
            self.rows or cfg.vocab_size,
            use_bias=False,
            dtype=jnp.dtype(cfg.dtype),
            kernel_init=nn.initializers.normal(_INIT_STD),
            name="out",
        )
        return _mask_padding(cfg, out(h_BTD))


def _mask_padding(cfg: ModelConfig, logits_BTV):
    """Logits of padded vocabulary entries (past `vocab_size`) set to -inf: they get no
    probability, no share of the log-sum-exp and no gradient."""
    if logits_BTV.shape[-1] == cfg.vocab_size:
        return logits_BTV
    real = jnp.arange(logits_BTV.shape[-1]) < cfg.vocab_size
    return jnp.where(real, logits_BTV, -jnp.inf)


def _vocab_leaves(cfg: ModelConfig, params, fn):
    """`params` (or a tree of their shape, e.g. optimizer moments) with `fn(leaf, dim)` applied
    to the token table and an untied head's kernel."""
    embed = {**params["embed"], "tok": fn(params["embed"]["tok"], 0)}
    head = params["head"]
    if not cfg.tied:
        head = {**head, "out": {**head["out"], "kernel": fn(head["out"]["kernel"], 1)}}
    return {**params, "embed": embed, "head": head}


def pad_vocab(cfg: ModelConfig, params, rows: int):
    """Params with `rows` vocabulary entries (rows >= vocab_size): the token table and an untied
    head kernel grown with zeros. Padded entries are never looked up and their logits are
    masked, so they stay zero in training and change no result; they let the vocabulary split
    evenly over devices."""
    if rows == cfg.vocab_size:
        return params

    def grow(a, dim):
        widths = [(0, 0)] * a.ndim
        widths[dim] = (0, rows - a.shape[dim])
        return jnp.pad(a, widths)

    return _vocab_leaves(cfg, params, grow)


def unpad_vocab(cfg: ModelConfig, params):
    """The inverse of `pad_vocab`: params with exactly `vocab_size` vocabulary entries."""
    cut = lambda a, dim: jax.lax.slice_in_dim(a, 0, cfg.vocab_size, axis=dim)
    return _vocab_leaves(cfg, params, cut)


# ---------------------------------------------------------------------------------------------
# Functional API used by the pipeline, the partitioner and the tests.


def compute_weights(cfg: ModelConfig, block_params):
    """Block params as the block computes with them: dense kernels and biases in the compute
    dtype (the cast `nn.Dense(dtype=...)` makes anyway, so results are unchanged), norms in
    float32."""
    dt = jnp.dtype(cfg.dtype)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: a if any("norm" in str(getattr(e, "key", "")) for e in path)
        else a.astype(dt),
        block_params,
    )


def block_apply(cfg: ModelConfig, block_params, x_BTD, lean: bool = True):
    """One block on its own (unstacked) parameters; `lean` (see `Block`): False where the
    caller recomputes the block whole."""
    return Block(cfg, lean).apply({"params": block_params}, x_BTD)


def block_fn(cfg: ModelConfig, remat: str = "none"):
    """`(block_params, x) -> x` under a remat mode: "none" a lean block; "layer" the block
    recomputed whole in its backward; "stage" a plain block, for a caller that recomputes it
    as part of something larger (a stage, or a checkpointed unit with its own policy)."""
    block = functools.partial(block_apply, cfg, lean=remat == "none")
    return jax.checkpoint(block) if remat == "layer" else block


def embed_apply(cfg: ModelConfig, params, tokens_BT, start=0):
    if tokens_BT.shape[1] > cfg.max_seq_len:
        raise ConfigError(
            f"sequence length {tokens_BT.shape[1]} exceeds the model's max_seq_len "
            f"{cfg.max_seq_len}; shorten --seq_len or raise max_seq_len"
        )
    rows = params["embed"]["tok"].shape[0]
    return Embed(cfg, rows).apply({"params": params["embed"]}, tokens_BT, start)


def stack_decode(cfg: ModelConfig, blocks, x_BTD, cache, start):
    """The stacked blocks on T tokens at positions start.. against a key/value cache
    (keys, values), each [L, B, S, G, K]; returns (x_BTD, updated cache)."""

    def layer(x, p_k_v):
        p, k, v = p_k_v
        x, (k, v) = Block(cfg).apply({"params": p}, x, (k, v), start)
        return x, (k, v)

    return jax.lax.scan(layer, x_BTD, (blocks, *cache))


def head_apply(cfg: ModelConfig, params, x_BTD):
    """Logits [B, T, rows]: one per vocabulary entry of the params (padded entries -inf)."""
    table = params["embed"]["tok"] if cfg.tied else None
    rows = table.shape[0] if cfg.tied else params["head"]["out"]["kernel"].shape[-1]
    return Head(cfg, rows).apply({"params": params["head"]}, x_BTD, table)


def cross_entropy(logits_BTV, targets_BT):
    """Mean next-token cross-entropy in float32: log-sum-exp minus the target's logit, picked by
    a masked sum. No [B, T, V] log-probabilities are formed, and with the vocabulary split over
    devices each device reduces its own slice (one all-reduce of [B, T] partial results)."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    hit_BTV = jnp.arange(logits_BTV.shape[-1]) == targets_BT[..., None]
    return jnp.mean(lse_BT - jnp.sum(jnp.where(hit_BTV, logits_BTV, 0.0), axis=-1))


def head_loss(cfg: ModelConfig, params, x_BTD, targets_BT):
    """The head and the cross-entropy of its logits against `targets_BT`."""
    return cross_entropy(head_apply(cfg, params, x_BTD), targets_BT)


def stack_forward(cfg: ModelConfig, blocks, x_BTD, remat: bool = False):
    """The reference: a scan over the stacked blocks."""
    fn = block_fn(cfg, "layer" if remat else "none")
    out, _ = jax.lax.scan(lambda x, p: (fn(p, x), None), x_BTD, blocks)
    return out


def reference_loss(cfg: ModelConfig, params, tokens_BT1):
    """Unpipelined loss on tokens of shape [B, T+1] (inputs are [:, :-1], targets [:, 1:])."""
    x_BTD = embed_apply(cfg, params, tokens_BT1[:, :-1])
    x_BTD = stack_forward(cfg, params["blocks"], x_BTD)
    return head_loss(cfg, params, x_BTD, tokens_BT1[:, 1:])


def init_params(cfg: ModelConfig, seed: int | jax.Array = 0, allow_large: bool = False):
    """Canonical parameters: the same seed gives the same values whatever the pipeline shape."""
    if cfg.num_params() > ALLOCATION_GUARD_PARAMS and not allow_large:
        raise ConfigError(
            f"model {cfg.name!r} has {cfg.num_params() / 1e9:.1f}B parameters; refusing to "
            f"allocate it (use it with the planner, or pass allow_large=True)"
        )
    if is_int(seed):
        check_seed(seed, "seed=")
        seed = jax.random.key(seed)
    return _init(cfg, seed)


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: ModelConfig, key: jax.Array):
    return init_arranged(cfg, key, np.arange(cfg.num_layers))


def init_arranged(cfg: ModelConfig, key: jax.Array, layer_index: np.ndarray):
    """The parameters `init_params` makes from `key`, with the block stack arranged by
    `layer_index` (canonical layer numbers of any shape, -1 for a zero padding slot): the leaves
    of "blocks" get `layer_index.shape` as their leading dims. Each layer's values come from its
    own key, so a layer is the same wherever it is placed; traced under `jit` with sharded
    outputs, each device computes only its own layers (random bits are partitionable)."""
    k_embed, k_blocks, k_head = jax.random.split(key, 3)
    tokens = jnp.zeros((1, 2), jnp.int32)
    x = jnp.zeros((1, 2, cfg.d_model), jnp.float32)
    embed = Embed(cfg).init(k_embed, tokens)["params"]
    index = np.asarray(layer_index)
    layer_keys = jax.random.split(k_blocks, cfg.num_layers)[np.maximum(index, 0).reshape(-1)]
    # Initialising traces the blocks on a 2-token stand-in; the attention kernel changes no
    # parameter, and one that needs longer sequences or a TPU (splash) cannot run on it.
    init_cfg = dataclasses.replace(cfg, attention="xla")
    blocks = jax.vmap(lambda k: Block(init_cfg).init(k, x)["params"])(layer_keys)
    pad = (index < 0).reshape(-1)

    def arrange(a):
        if pad.any():
            a = jnp.where(pad.reshape(pad.shape + (1,) * (a.ndim - 1)), jnp.zeros((), a.dtype), a)
        return a.reshape(index.shape + a.shape[1:])

    blocks = jax.tree.map(arrange, blocks)
    table = embed["tok"] if cfg.tied else None
    head = Head(cfg).init(k_head, x, table)["params"]
    return {"embed": embed, "blocks": blocks, "head": head}


def abstract_params(cfg: ModelConfig):
    """Parameter shapes without allocating anything (works for 175B models)."""
    return jax.eval_shape(lambda: init_params(cfg, 0, allow_large=True))
