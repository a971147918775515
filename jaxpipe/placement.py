"""Sharding rules in one place: which parameter dims go on `pipe` and `tensor`, batch on `data`.

Block parameters carry leading stack dims (`[L]` canonical, `[S, R, J]` pipeline view); the
first of them goes on `pipe` in the pipeline view. Inside a block, Megatron-style tensor
parallelism splits over `tensor`:

- column split (output dim): q, k, v, mlp up, mlp gate kernels and their biases;
- row split (input dim): attn o and mlp down kernels (their biases stay replicated);
- norms, the embedding and the head are replicated.

So each device holds whole heads (and whole kv groups with grouped-query attention) and a slice
of the MLP hidden units; one all-reduce over `tensor` after o and one after down combine them.
`tensor` is an Auto mesh axis inside the pipe-manual `shard_map`, so GSPMD partitions the
matmuls from these input shardings.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpipe.config import ModelConfig, check_tensor_parallel

# (module, param) -> spec of the param's own dims (after the stack dims).
_COLUMN = {"kernel": (None, "tensor"), "bias": ("tensor",)}
_ROW = {"kernel": ("tensor", None), "bias": (None,)}
BLOCK_RULES: dict[str, dict[str, tuple]] = {
    "q": _COLUMN,
    "k": _COLUMN,
    "v": _COLUMN,
    "o": _ROW,
    "up": _COLUMN,
    "gate": _COLUMN,
    "down": _ROW,
}

BATCH_SPEC = P("data")
ACTIVATION_SPEC = P("data", None, None)  # [B, T, D] inside a stage: batch on `data`


def _key(entry) -> str | None:
    return getattr(entry, "key", getattr(entry, "name", None))


def block_leaf_spec(path, ndim: int, stack_spec: tuple) -> P:
    """Spec of one block leaf: `stack_spec` for its stack dims, the tensor rule for the rest."""
    names = [_key(e) for e in path]
    module, param = names[-2] if len(names) > 1 else None, names[-1]
    own = BLOCK_RULES.get(module, {}).get(param)
    own_ndim = ndim - len(stack_spec)
    if own_ndim < 0:
        raise ValueError(f"leaf {names} has {ndim} dims, fewer than the stack dims {stack_spec}")
    if own is None or len(own) != own_ndim:
        own = (None,) * own_ndim
    return P(*stack_spec, *own)


def block_specs(blocks, stack_spec: tuple = ("pipe", None, None)):
    """PartitionSpecs for stacked block params; default: the `[S, R, J, ...]` pipeline view.

    Use `stack_spec=(None,)` for the canonical `[L, ...]` stack (tensor split only).
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: block_leaf_spec(path, np.ndim(leaf), stack_spec), blocks
    )


def param_specs(params, stack_spec: tuple = ("pipe", None, None)):
    """Specs for {"embed", "blocks", "head"}: blocks by the rules above, the rest replicated."""
    return {
        "embed": jax.tree.map(lambda _: P(), params["embed"]),
        "blocks": block_specs(params["blocks"], stack_spec),
        "head": jax.tree.map(lambda _: P(), params["head"]),
    }


def param_shardings(
    mesh: Mesh, params, cfg: ModelConfig | None = None, stack_spec: tuple = ("pipe", None, None)
):
    """NamedShardings for `param_specs` on `mesh`; checks the model splits over `tensor`."""
    if cfg is not None:
        check_tensor_parallel(cfg, mesh.shape.get("tensor", 1))
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        param_specs(params, stack_spec),
        is_leaf=lambda x: isinstance(x, P),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches `[B, T+1]`: rows split over `data`, replicated over `pipe` and `tensor`."""
    return NamedSharding(mesh, BATCH_SPEC)


def constrain_activation(x_BTD: jax.Array) -> jax.Array:
    """Pins a stage's activations to batch-on-`data`, replicated over `tensor` (Megatron's
    layout between blocks); a no-op outside a mesh context."""
    return jax.lax.with_sharding_constraint(x_BTD, ACTIVATION_SPEC)


def global_batch(host_batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The same global host batch on every process -> one global array (multi-process safe).

    Each process copies only the rows its own devices hold.
    """
    host_batch = np.asarray(host_batch)
    return jax.make_array_from_callback(host_batch.shape, sharding, lambda idx: host_batch[idx])
