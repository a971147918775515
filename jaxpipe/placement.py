"""Sharding rules in one place: which parameter dims go on `pipe` and `tensor`, batch on `data`.

Block parameters carry leading stack dims (`[L]` canonical, `[S, R, J]` pipeline view); the
first of them goes on `pipe` in the pipeline view. Inside a block, Megatron-style tensor
parallelism splits over `tensor`:

- column split (output dim): q, k, v, mlp up, mlp gate kernels and their biases;
- row split (input dim): attn o and mlp down kernels (their biases stay replicated);
- norms are replicated.

So each device holds whole heads (and whole kv groups with grouped-query attention) and a slice
of the MLP hidden units; one all-reduce over `tensor` after o and one after down combine them.
`tensor` is an Auto mesh axis inside the pipe-manual `shard_map`, so GSPMD partitions the
matmuls from these input shardings.

The embedding and the head are vocabulary-parallel (Megatron-style): the token table `[V, D]`
and an untied head's output kernel `[D, V]` split their vocabulary dim over `tensor`; a V that
does not divide by `tensor` is padded in the pipeline layout (`vocab_rows`: zero rows whose
logits are masked, dropped again in the canonical layout and in checkpoints); each device looks
up the tokens of its slice and computes the logits of its slice, and the loss takes a
log-sum-exp over the split vocabulary (each device reduces its own slice; the logits are never
gathered). Learned positions and norms stay replicated.

Over `data`, `over_data` adds the axis to one more dim of a spec: ZeRO-1 (`zero1`) splits the
AdamW moments that way, FSDP (`fsdp`) the block parameters too (see `train.py`).
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

# Vocabulary-parallel leaves: (module, param) -> spec, applied when V divides by `tensor`.
VOCAB_RULES: dict[tuple[str, str], tuple] = {
    ("embed", "tok"): ("tensor", None),
    ("head", "kernel"): (None, "tensor"),  # the untied head's Dense "out"
}

def free_axes() -> dict[str, int]:
    """Sizes of the mesh axes that are not manual where this is traced (inside the pipeline's
    `shard_map`: `data` and `tensor`); empty outside any mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return {}
    return {a: mesh.shape[a] for a in mesh.axis_names if a not in mesh.manual_axes}


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


VOCAB_PAD_MULTIPLE = 128  # a padded vocabulary is a multiple of this times `tensor`


def vocab_rows(vocab_size: int, tensor: int) -> int:
    """Vocabulary entries the embedding and the head hold in the pipeline layout: V when it
    divides by `tensor`, else V padded to a multiple of 128 x `tensor` (as Megatron pads; every
    device's slice then stays a multiple of 128 lanes). See `model.pad_vocab`."""
    if vocab_size % tensor == 0:
        return vocab_size
    step = VOCAB_PAD_MULTIPLE * tensor
    return -(-vocab_size // step) * step


def vocab_split(vocab_size: int, tensor: int) -> bool:
    """Whether a table of `vocab_size` entries splits its vocabulary over `tensor`."""
    return vocab_size % tensor == 0


def _outer_spec(part: str, path, leaf, split: bool) -> P:
    rule = VOCAB_RULES.get((part, _key(path[-1])))
    return P(*rule) if split and rule is not None and np.ndim(leaf) == len(rule) else P()


def param_specs(params, stack_spec: tuple = ("pipe", None, None), tensor: int = 1):
    """Specs for {"embed", "blocks", "head"}: blocks by the rules above; the token table and an
    untied head kernel vocabulary-parallel when V divides by `tensor`; the rest replicated."""
    split = vocab_split(params["embed"]["tok"].shape[0], tensor)
    outer = lambda part: jax.tree_util.tree_map_with_path(
        lambda path, leaf: _outer_spec(part, path, leaf, split), params[part]
    )
    return {
        "embed": outer("embed"),
        "blocks": block_specs(params["blocks"], stack_spec),
        "head": outer("head"),
    }


def over_data(spec: P, shape: tuple, data: int) -> P:
    """`spec` with `data` added on the largest dim it leaves unsplit that `data` divides (the
    first such dim on ties); `spec` itself when there is none or `data` is 1."""
    dims = list(spec) + [None] * (len(shape) - len(spec))
    pairs = enumerate(zip(shape, dims, strict=True))
    free = [i for i, (n, ax) in pairs if ax is None and n % data == 0]
    if data == 1 or not free or "data" in dims:
        return spec
    best = max(free, key=lambda i: (shape[i], -i))
    dims[best] = "data"
    return P(*dims)


def param_shardings(
    mesh: Mesh,
    params,
    cfg: ModelConfig | None = None,
    stack_spec: tuple = ("pipe", None, None),
    fsdp: bool = False,
):
    """NamedShardings for `param_specs` on `mesh` (block leaves also split over `data` with
    `fsdp`); checks the model splits over `tensor`."""
    tensor = mesh.shape.get("tensor", 1)
    if cfg is not None:
        check_tensor_parallel(cfg, tensor)
    specs = param_specs(params, stack_spec, tensor)
    if fsdp:
        data = mesh.shape.get("data", 1)
        specs["blocks"] = jax.tree.map(
            lambda spec, leaf: over_data(spec, np.shape(leaf), data),
            specs["blocks"],
            params["blocks"],
            is_leaf=lambda x: isinstance(x, P),
        )
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P)
    )


def fit(sharding: NamedSharding, shape: tuple) -> NamedSharding:
    """`sharding` made valid for an array of `shape`: the mesh axes of a dim they do not divide
    move to the largest unsplit dim they do divide, or are dropped (that dim replicated). A
    canonical `[V, D]` table whose V the pipeline layout pads keeps its split, on D."""
    mesh = sharding.mesh
    dims = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    size = lambda e: int(np.prod([mesh.shape[a] for a in (e if isinstance(e, tuple) else (e,))]))
    for i, e in enumerate(dims):
        if e is None or shape[i] % size(e) == 0:
            continue
        dims[i] = None
        free = [j for j, n in enumerate(shape) if dims[j] is None and j != i and n % size(e) == 0]
        if free:
            dims[max(free, key=lambda j: (shape[j], -j))] = e
    return NamedSharding(mesh, P(*dims))


def data_sharded(sharding: NamedSharding, leaf) -> NamedSharding:
    """`sharding` of an array like `leaf` with `over_data` applied (ZeRO-1: how an optimizer
    moment is split)."""
    data = sharding.mesh.shape.get("data", 1)
    return NamedSharding(sharding.mesh, over_data(sharding.spec, np.shape(leaf), data))


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
