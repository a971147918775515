"""Static buffer slots of the forward + backward executor, read off a schedule table."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpipe.schedule import BWD, FWD, WGT, ScheduleTable, fused_backward, op_deps, op_ticks


@dataclasses.dataclass(frozen=True, eq=False)
class BufferPlan:
    """Static buffer slots for `onef1b`; [ticks, stages] int32 arrays, -1 where unused.

    act_write: [3, ticks, stages]: inbox slot for the activation arriving at the start of the
        tick on each channel (`schedule.NEXT`, `PREV`, `SELF`: from the stage before on the
        ring, from the stage after, or kept from the stage's own previous tick).
    act_read: inbox slot a forward reads (-1: virtual stage 0 reads the embedded input).
    grad_write [3, ticks, stages] / grad_read: the same for gradients; head_write: slot where
    the last virtual stage's forward leaves its loss gradient for its own later backward.
    res_slot: stash slot of a forward's residuals (written by the forward, read by the backward).
    wres_slot: split tables: stash slot of the residuals W reads too (written by the forward,
        read by B and by W, which frees it).
    carry_slot: split tables: slot of what B leaves for its W (written by B, read by W); -1 for
        the pairs the executor runs together at the B's tick (`schedule.fused_backward`).
    """

    act_write: np.ndarray
    act_read: np.ndarray
    grad_write: np.ndarray
    grad_read: np.ndarray
    head_write: np.ndarray
    res_slot: np.ndarray
    wres_slot: np.ndarray
    carry_slot: np.ndarray
    num_act: int
    num_grad: int
    num_res: int
    num_wres: int
    num_carry: int


def buffer_plan(table: ScheduleTable) -> BufferPlan:
    """Assigns buffer slots to every value a stage holds between ticks (interval colouring).

    A value arriving at tick a and consumed at tick c holds its slot over [a, c]; the slot is
    free again from c + 1. Sizes are the peaks over stages, so they grow with what is in flight
    (about S for 1f1b), never with the number of micro-batches as such.
    """
    S, V = table.num_stages, table.num_stages * table.num_repeats
    where = op_ticks(table)
    fused = fused_backward(table)
    shape = table.op.shape
    act = {"write": -np.ones((3,) + shape, np.int32), "read": -np.ones(shape, np.int32)}
    grad = {"write": -np.ones((3,) + shape, np.int32), "read": -np.ones(shape, np.int32)}
    head_write, res_slot = -np.ones(shape, np.int32), -np.ones(shape, np.int32)
    carry_slot, wres_slot = -np.ones(shape, np.int32), -np.ones(shape, np.int32)
    acts, grads, ress, wress, carries = ([[] for _ in range(S)] for _ in range(5))
    for (o, m, v), t in where.items():
        s = table.device_of(v)[0]
        # F after F of v - 1 and B after B of v + 1 read an inbox, written the tick after the
        # producer ran (from a neighbour, or from the device itself at the turn of a V).
        for d in op_deps(o, m, v, V):
            if d[0] == o:
                kind = "a" if o == FWD else "g"
                info = (kind, m, v, table.channel(d[2], v))
                (acts if o == FWD else grads)[s].append((where[d] + 1, t, info))
        if o == FWD:
            ress[s].append((t, where[(BWD, m, v)], ("r", m, v, -1)))
        if o == FWD and table.split:
            wress[s].append((t, where[(WGT, m, v)], ("w", m, v, -1)))
        if o == BWD and v == V - 1:
            grads[s].append((where[(FWD, m, v)], t, ("h", m, v, -1)))
        if o == WGT and not fused[t, s]:  # a fused pair's B leaves W no carry
            carries[s].append((where[(BWD, m, v)], t, ("c", m, v, -1)))
    sizes = []
    for lists in (acts, grads, ress, wress, carries):
        peak = 0
        for s, intervals in enumerate(lists):
            for (a, c, (kind, m, v, ch)), k in zip(intervals, _colour(intervals), strict=True):
                peak = max(peak, k + 1)
                if kind == "a":
                    act["write"][ch, a, s], act["read"][c, s] = k, k
                elif kind == "g":
                    grad["write"][ch, a, s], grad["read"][c, s] = k, k
                elif kind == "h":
                    head_write[a, s], grad["read"][c, s] = k, k
                elif kind == "c":
                    carry_slot[a, s], carry_slot[c, s] = k, k
                elif kind == "w":  # B, between the F and the W, reads this stash too
                    wres_slot[a, s], wres_slot[c, s] = k, k
                    wres_slot[where[(BWD, m, v)], s] = k
                else:
                    res_slot[a, s], res_slot[c, s] = k, k
        sizes.append(max(peak, 1))
    return BufferPlan(
        act["write"],
        act["read"],
        grad["write"],
        grad["read"],
        head_write,
        res_slot,
        wres_slot,
        carry_slot,
        *sizes,
    )


def _colour(intervals) -> list[int]:
    """Lowest free slot for each inclusive interval, in order of start (optimal for intervals)."""
    order = sorted(range(len(intervals)), key=lambda i: intervals[i][:2])
    slot_free_at: list[int] = []
    out = [0] * len(intervals)
    for i in order:
        a, c = intervals[i][:2]
        k = next((k for k, f in enumerate(slot_free_at) if f <= a), len(slot_free_at))
        if k == len(slot_free_at):
            slot_free_at.append(0)
        slot_free_at[k], out[i] = c + 1, k
    return out
