"""Integrity fingerprints of sharded arrays, computed on the devices that hold them.

The digest of an array is a sum, modulo 2**32, of one term per element:
`fmix(position_hash ^ bits)`, where `bits` is the element's bit pattern as a 32-bit word and
`position_hash` mixes its index along every dimension; `fmix` is MurmurHash3's finaliser (a
bijection of 32-bit words). Two such sums with different seeds make a 64-bit digest.

A sum does not depend on how the array is split: each device sums the elements of its own shard
(XLA's partitioned reduction counts a replicated shard once) and one all-reduce of two words per
array adds the partial sums. So the digest is computed where each shard lives, no host or device
ever gathers an array, and a checkpoint saved at one mesh shape or process count verifies at any
other. Changing one 32-bit word of an array always changes the digest (its term is a bijection
of the word); other changes that are not crafted to cancel go unnoticed with a probability of
about 2**-64. Like a CRC, it is no proof against deliberate edits.

`crc32_fingerprint` is the previous fingerprint (a CRC32 of every whole array, gathered to each
host): it verifies checkpoints of format 1.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

SEEDS = (0x243F6A88, 0x85A308D3)  # one per 32-bit half of the digest (digits of pi)
_GOLDEN = 0x9E3779B9  # spreads the per-dimension seeds


def _fmix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection mixing every input bit into every output."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """Element bits as uint32 (8- and 16-bit types widened; 64-bit ones gain a last dim of 2)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = jnp.dtype(x.dtype).itemsize * 8
    if bits < 32:
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _digest(x: jax.Array, seed: int) -> jax.Array:
    """Sum over the elements of fmix(position_hash ^ bits), as uint32."""
    w = _words(x)
    position = jnp.uint32(seed)
    for d, n in enumerate(w.shape):  # one small vector per dimension, broadcast
        along = _fmix(jnp.arange(n, dtype=jnp.uint32) + jnp.uint32((seed + d * _GOLDEN) % 2**32))
        position = position ^ along.reshape([n if i == d else 1 for i in range(w.ndim)])
    return jnp.sum(_fmix(position ^ w), dtype=jnp.uint32)


def _both(x: jax.Array) -> jax.Array:
    return jnp.stack([_digest(x, seed) for seed in SEEDS])


@functools.lru_cache(maxsize=16)
def _digester(replicated: jax.sharding.Sharding):
    """One program per leaf shape, dtype and sharding (the moments share the params'), so
    a larger model compiles no more of them."""
    return jax.jit(_both, out_shardings=replicated)


def _replicated(leaf: jax.Array) -> jax.sharding.Sharding:
    """A sharding that replicates a result over the leaf's devices."""
    sharding = leaf.sharding
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P())
    if len(sharding.device_set) == 1:
        return sharding
    raise TypeError(f"cannot fingerprint an array with sharding {sharding}; use a NamedSharding")


def digests(leaves: list) -> np.ndarray:
    """[len(leaves), 2] uint32 digests of arrays (a collective across processes:
    every process calls it with the same global arrays); the partial sums of each device's
    shards are combined on the devices and only the result comes to the host."""
    if not leaves:
        return np.zeros((0, 2), np.uint32)
    leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in leaves]
    # One leaf at a time: with dozens of these collective programs in flight at once, the CPU
    # runtime aborted the process now and then.
    return np.stack([np.asarray(_digester(_replicated(x))(x).addressable_data(0)) for x in leaves])


def fingerprint(tree) -> dict[str, list]:
    """Shape, dtype and the 64-bit digest (16 hex digits) of every leaf, keyed by its path.

    Only the digests (8 bytes an array) leave the devices.
    """
    found = jax.tree_util.tree_leaves_with_path(tree)
    d = digests([leaf for _, leaf in found]).tolist()
    return {
        jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype), f"{hi:08x}{lo:08x}"]
        for (path, leaf), (hi, lo) in zip(found, d, strict=True)
    }


def _host_copy(leaf) -> np.ndarray:
    """The whole array on this host (gathered from every process when it spans several)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def crc32_fingerprint(tree) -> dict[str, list]:
    """Shape, dtype and CRC32 of every whole leaf (format 1), one leaf on the host at a time."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.ascontiguousarray(_host_copy(leaf))
        out[jax.tree_util.keystr(path)] = [list(a.shape), str(a.dtype), zlib.crc32(a.tobytes())]
    return out


def mismatches(got: dict, saved: dict) -> list[str]:
    """The sorted keys whose entries differ (or that only one of the two holds)."""
    return sorted(k for k in set(got) | set(saved) if got.get(k) != saved.get(k))
