"""Event simulation of a schedule table with per-stage op times and a link time.

Each stage runs its ops in the table's order (read down its column). An op starts when its stage
is free and its inputs have arrived: the forward of virtual stage v waits for the forward of
v - 1 plus the link time, the backward of v for the backward of v + 1 plus the link time and for
its own forward. Ticks only fix the order; the simulated clock comes from the costs, so uneven
stages and slow links show up as they would on hardware.

`lockstep=True` models jaxpipe's SPMD executors instead: every tick ends with one collective
permute over the `pipe` axis, so a tick starts only when every stage has finished the previous
one and its send arrived; each tick lasts as long as its slowest op plus the link time.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpipe.schedule import BWD, FWD, IDLE, ScheduleTable


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
) -> Simulation:
    """Predicts step time and per-stage idle time of a forward + backward table.

    Args:
      table: from `schedule.full_table` (a forward-only table simulates its forward half).
      fwd_time: forward seconds per micro-batch, per stage [S] (a stage's repeats share it) or
        per virtual stage [S * R]; a scalar means every stage alike.
      bwd_time: backward seconds, same shapes (default 2 x fwd_time).
      link_time: seconds to send one activation or gradient to a neighbouring stage.
      lockstep: every tick waits for the slowest stage of the previous one (SPMD executors).
      concurrency: with lockstep, how many stages' ops run at full speed at once (devices
        sharing a host's cores): a tick lasts at least its ops' total over `concurrency`.
    """
    S, R = table.num_stages, table.num_repeats
    V = S * R
    tf = _per_virtual_stage(fwd_time, S, R)
    tb = 2 * tf if bwd_time is None else _per_virtual_stage(bwd_time, S, R)
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
                v = np.maximum(table.repeat[t], 0) * S + np.arange(S)
                cost = np.where(table.op[t] == FWD, tf[v], np.where(busy, tb[v], 0.0))
                tick = cost.max()
                if concurrency is not None:
                    tick = max(tick, cost.sum() / concurrency)
                start[t, busy], end[t, busy] = clock, clock + cost[busy]
                clock += max(tick, link) if table.hop > 1 else tick + link
            continue
        for s in range(S):
            o = table.op[t, s]
            if o not in (FWD, BWD):
                continue
            m, v = int(table.micro[t, s]), int(table.repeat[t, s]) * S + s
            ready = free[s]
            if o == FWD and v > 0:
                ready = max(ready, finish[(FWD, m, v - 1)] + link)
            if o == BWD:
                ready = max(ready, finish.get((FWD, m, v), 0.0))
                if v < V - 1:
                    ready = max(ready, finish[(BWD, m, v + 1)] + link)
            cost = tf[v] if o == FWD else tb[v]
            start[t, s], end[t, s] = ready, ready + cost
            finish[(int(o), m, v)] = free[s] = ready + cost
    step = clock if lockstep else float(np.nanmax(end))
    busy = np.nansum(end - start, axis=0)
    return Simulation(table, start, end, step, busy, step - busy)
