"""Event simulation of a schedule table with per-stage op times and a link time.

Each stage runs its ops in the table's order (read down its column). An op starts when its stage
is free and its inputs (`schedule.op_deps`) have arrived, plus the link time when they come from
another device: the forward of virtual stage v waits for the forward of v - 1, the backward of v
for the backward of v + 1 and its own forward, a W for its B. Ticks only fix the order; the
simulated clock comes from the costs, so uneven stages and slow links show up as they would on
hardware.

`lockstep=True` models jaxpipe's SPMD executors instead: every tick ends with one collective
permute over the `pipe` axis, so a tick starts only when every stage has finished the previous
one and its send arrived; each tick lasts as long as its slowest op plus the link time.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpipe.schedule import BWD, FWD, IDLE, WGT, ScheduleTable, op_deps


@dataclasses.dataclass(frozen=True)
class Simulation:
    """start/end: [ticks, stages] seconds (NaN where idle); totals per stage."""

    table: ScheduleTable
    start: np.ndarray
    end: np.ndarray
    step_time: float
    busy_S: np.ndarray
    idle_S: np.ndarray

    @property
    def bubble_fraction(self) -> float:
        """Idle share of stage-time over the step."""
        return float(self.idle_S.sum() / (self.step_time * len(self.idle_S)))


def _per_virtual_stage(times, S: int, R: int) -> np.ndarray:
    """Costs given per stage [S] (split evenly over repeats) or per virtual stage [S * R]."""
    a = np.broadcast_to(np.asarray(times, np.float64), (S,)) if np.ndim(times) == 0 else None
    a = np.asarray(times, np.float64) if a is None else a
    if a.shape == (S * R,):
        return a
    if a.shape == (S,):
        return np.tile(a / R, R)
    raise ValueError(f"costs must have shape [{S}] or [{S * R}], got {a.shape}")


def simulate(
    table: ScheduleTable,
    fwd_time,
    bwd_time=None,
    link_time: float = 0.0,
    lockstep: bool = False,
    concurrency: int | None = None,
    wgt_time=None,
) -> Simulation:
    """Predicts step time and per-stage idle time of a forward + backward table.

    Args:
      table: from `schedule.full_table` (a forward-only table simulates its forward half).
      fwd_time: forward seconds per micro-batch, per stage [S] (a stage's repeats share it) or
        per virtual stage [S * R]; a scalar means every stage alike.
      bwd_time: backward seconds, same shapes (default 2 x fwd_time; in a split table, the
        input-gradient op B alone, default fwd_time).
      link_time: seconds to send one activation or gradient to another device.
      lockstep: every tick waits for the slowest stage of the previous one (SPMD executors).
      concurrency: with lockstep, how many stages' ops run at full speed at once (devices
        sharing a host's cores): a tick lasts at least its ops' total over `concurrency`.
      wgt_time: seconds of a split table's W op, same shapes (default fwd_time).
    """
    S, R = table.num_stages, table.num_repeats
    V = S * R
    tf = _per_virtual_stage(fwd_time, S, R)
    split = table.split
    tb = (tf if split else 2 * tf) if bwd_time is None else _per_virtual_stage(bwd_time, S, R)
    tw = tf if wgt_time is None else _per_virtual_stage(wgt_time, S, R)
    cost_of = {FWD: tf, BWD: tb, WGT: tw}
    start = np.full(table.op.shape, np.nan)
    end = np.full(table.op.shape, np.nan)
    finish: dict[tuple[int, int, int], float] = {}
    free = np.zeros(S)
    link = link_time if S > 1 else 0.0
    clock = 0.0  # lockstep: when the current tick starts
    # Visit cells tick by tick: the table orders every op after its inputs.
    for t in range(table.num_ticks):
        if lockstep:
            busy = table.op[t] != IDLE
            if busy.any():
                v = table.virtual_stage(np.arange(S), np.maximum(table.repeat[t], 0))
                cost = np.zeros(S)
                for o, times in cost_of.items():
                    cost = np.where(table.op[t] == o, times[v], cost)
                tick = cost.max()
                if concurrency is not None:
                    tick = max(tick, cost.sum() / concurrency)
                start[t, busy], end[t, busy] = clock, clock + cost[busy]
                clock += max(tick, link) if table.hop > 1 else tick + link
            continue
        for s in range(S):
            o = int(table.op[t, s])
            if o == IDLE:
                continue
            m, v = int(table.micro[t, s]), int(table.virtual_stage(s, int(table.repeat[t, s])))
            ready = free[s]
            for d in op_deps(o, m, v, V):
                # A forward-only table has no backward ops to wait for.
                if d in finish:
                    hop = link if table.device_of(d[2])[0] != s else 0.0
                    ready = max(ready, finish[d] + hop)
            cost = cost_of[o][v]
            start[t, s], end[t, s] = ready, ready + cost
            finish[(o, m, v)] = free[s] = ready + cost
    step = clock if lockstep else float(np.nanmax(end))
    busy = np.nansum(end - start, axis=0)
    return Simulation(table, start, end, step, busy, step - busy)
