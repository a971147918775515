"""Slot buffers of the forward + backward executor: what a forward keeps for its backward, and
what a split backward's B leaves for its W.

Each kind of value lives in slots that `buffers.buffer_plan` assigns per tick:
  res    forward -> backward (B): residual leaves only the backward reads;
  wres   forward -> W: residual leaves W reads too (split tables);
  carry  B -> W: what B computed that W needs (output cotangents; under remat the recomputed
         matmul inputs too).
In a split table a micro-batch's B-only residuals die at its B, where its carry is born, and
both fit in its wres interval [F, W]. So a carry leaf can take over the slot of a B-only leaf of
the same size and dtype: B reads the residual and writes the carry over it. `Stash` pairs such
leaves (`pairs`) whenever a wres slot costs less than a res slot plus a carry slot; in a
transformer block the output cotangents match the B-only residuals' sizes almost one for one, so
the split stash takes about the bytes of the fused one. Unpaired leaves keep buffers of their own.

All writes are in-place slot updates; callers pass the buffers through the conditional whose op
writes them, so idle ticks move no bytes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _write(buf, x, slot):
    return jax.lax.dynamic_update_index_in_dim(buf, x.reshape(buf.shape[1:]), slot, 0)


def _read(buf, slot, shape):
    return jax.lax.dynamic_index_in_dim(buf, slot, 0, False).reshape(shape)


def _same_shape(a) -> tuple:
    return tuple(a.shape), jnp.dtype(a.dtype).name


def _same_size(a) -> tuple:
    return math.prod(a.shape), jnp.dtype(a.dtype).name


# Leaves of the same shape pair first (no relayout on tiled TPU layouts), then of the same size.
_KEYS = (_same_shape, _same_size)


class Stash:
    """The residual stash and B's carries of one stage, for `onef1b`'s tick loop.

    `res_shapes`: the forward's residual leaves; `w_kept`: the indices of those W reads (split
    tables); `carry_shapes`: what B leaves for W. Slots come per tick as a dict of scalars
    {"res", "wres", "carry"} (the plan's `res_slot`, `wres_slot`, `carry_slot` at the tick).
    `pair=False` keeps every leaf in a buffer of its own: XLA's generic copy insertion (GPU's;
    CPU's without region analysis) copies a buffer whole on every tick when two conditionals of
    the tick update it in place, as the forward's and B's do a pair's.

    `near[j]`: the residual leaves carry leaf j is computed from, nearest first
    (`BackwardSplit.carry_near`). A carry takes the slot of the nearest one that fits: B then
    reads that residual and writes the carry over it in one pass. Paired across layers instead
    (the backward makes the last layer's carries first), B's write into one buffer would read
    another that its next write overwrites, and XLA copies a buffer whole to order them."""

    def __init__(self, plan, res_shapes, w_kept=(), carry_shapes=(), pair=True, near=()):
        self.plan, self.w_kept = plan, tuple(w_kept)
        self.res_shapes, self.carry_shapes = list(res_shapes), list(carry_shapes)
        b_only = [i for i in range(len(res_shapes)) if i not in self.w_kept]
        self.pairs: list[tuple[int, int]] = []  # (residual leaf, carry leaf) sharing a buffer
        if pair and self.carry_shapes and plan.num_wres <= plan.num_res + plan.num_carry:
            free, unpaired = list(b_only), list(range(len(self.carry_shapes)))
            near = list(near) or [()] * len(self.carry_shapes)
            for key in _KEYS:
                for j in list(unpaired):
                    a = self.carry_shapes[j]
                    fits = [i for i in (*near[j], *free)
                            if i in free and key(self.res_shapes[i]) == key(a)]
                    i = fits[0] if fits else None
                    if i is not None:
                        free.remove(i)
                        unpaired.remove(j)
                        self.pairs.append((i, j))
            self.pairs.sort()
        self.pair_of_res = {i: p for p, (i, _) in enumerate(self.pairs)}
        self.pair_of_carry = {j: p for p, (_, j) in enumerate(self.pairs)}

    def zeros(self):
        """The buffers, zero-filled (every slot is written before it is read)."""
        p = self.plan
        z = lambda n, a: jnp.zeros((n,) + tuple(a.shape), a.dtype)  # noqa: E731
        return {
            "res": {i: z(p.num_wres if i in self.w_kept else p.num_res, a)
                    for i, a in enumerate(self.res_shapes) if i not in self.pair_of_res},
            "carry": {j: z(p.num_carry, a)
                      for j, a in enumerate(self.carry_shapes) if j not in self.pair_of_carry},
            "pair": {n: z(p.num_wres, self.res_shapes[i]) for n, (i, _) in enumerate(self.pairs)},
        }

    def _res_at(self, i, k):
        """(buffer, slot) of residual leaf i."""
        if i in self.pair_of_res:
            return ("pair", self.pair_of_res[i]), k["wres"]
        return ("res", i), (k["wres"] if i in self.w_kept else k["res"])

    def _carry_at(self, j, k):
        if j in self.pair_of_carry:
            return ("pair", self.pair_of_carry[j]), k["wres"]
        return ("carry", j), k["carry"]

    @staticmethod
    def _put(bufs, places, xs):
        """Each x into its (buffer, slot) place, in place."""
        for ((kind, n), slot), x in zip(places, xs, strict=True):
            bufs = {**bufs, kind: {**bufs[kind], n: _write(bufs[kind][n], x, slot)}}
        return bufs

    @staticmethod
    def _get(bufs, where, slot, shape):
        kind, n = where
        return _read(bufs[kind][n], slot, shape)

    def write_forward(self, bufs, kept, k):
        """A forward's residual leaves into their slots."""
        return self._put(bufs, [self._res_at(i, k) for i in range(len(kept))], kept)

    def read_backward(self, bufs, k):
        """Every residual leaf of the micro-batch whose backward (or B) runs this tick."""
        return [self._get(bufs, *self._res_at(i, k), a.shape)
                for i, a in enumerate(self.res_shapes)]

    def write_carry(self, bufs, carry, k):
        """What B leaves for W; a paired leaf over the residual B has just read."""
        return self._put(bufs, [self._carry_at(j, k) for j in range(len(carry))], carry)

    def read_weight(self, bufs, k):
        """(the residual leaves W reads, B's carry) of the micro-batch whose W runs this tick."""
        kept_w = [self._get(bufs, *self._res_at(i, k), self.res_shapes[i].shape)
                  for i in self.w_kept]
        carry = [self._get(bufs, *self._carry_at(j, k), a.shape)
                 for j, a in enumerate(self.carry_shapes)]
        return kept_w, carry
