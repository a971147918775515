"""Static schedule tables: for each tick and stage, which op runs.

A table is the single description of a schedule. The executor indexes it inside its
`lax.scan`, the validator checks it, and the bubble fraction and ASCII chart are read off it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpipe.config import SCHEDULES, ConfigError

IDLE, FWD, BWD = 0, 1, 2


@dataclasses.dataclass(frozen=True, eq=False)
class ScheduleTable:
    """op/micro/repeat are [ticks, stages] arrays; micro and repeat are -1 where op is IDLE."""

    name: str
    num_stages: int
    num_microbatches: int
    num_repeats: int
    op: np.ndarray
    micro: np.ndarray
    repeat: np.ndarray

    @property
    def num_ticks(self) -> int:
        return self.op.shape[0]

    @property
    def busy(self) -> np.ndarray:
        return self.op != IDLE

    def bubble_fraction(self) -> float:
        """Idle share of all (tick, stage) slots, every op costing one tick."""
        return 1.0 - float(self.busy.sum()) / self.op.size

    def ascii(self) -> str:
        """One row per stage; cells are `F<m>.<r>` / `B<m>.<r>` or `.` for idle."""
        cells = []
        for s in range(self.num_stages):
            row = []
            for t in range(self.num_ticks):
                o = self.op[t, s]
                if o == IDLE:
                    row.append(".")
                else:
                    tag = "F" if o == FWD else "B"
                    rep = f".{self.repeat[t, s]}" if self.num_repeats > 1 else ""
                    row.append(f"{tag}{self.micro[t, s]}{rep}")
            cells.append(row)
        width = max(len(c) for row in cells for c in row)
        return "\n".join(
            f"stage {s}: " + " ".join(c.rjust(width) for c in row) for s, row in enumerate(cells)
        )


def ring_table(name: str, num_stages: int, num_microbatches: int, num_repeats: int):
    """GPipe (R = 1) and circular GPipe (R > 1): stage s runs item i = t - s at tick t.

    Item i is micro-batch i mod M' of repeat i // M', where M' = max(M, S) when R > 1 so that a
    micro-batch leaving the last stage is back on stage 0 before its next repeat is due; slots
    with micro-batch >= M are idle.
    """
    S, M, R = num_stages, num_microbatches, num_repeats
    period = max(M, S) if R > 1 else M
    T = R * period + S - 1
    op = np.full((T, S), IDLE, np.int8)
    micro = -np.ones((T, S), np.int32)
    repeat = -np.ones((T, S), np.int32)
    for t in range(T):
        for s in range(S):
            i = t - s
            if 0 <= i < R * period and i % period < M:
                op[t, s], micro[t, s], repeat[t, s] = FWD, i % period, i // period
    return ScheduleTable(name, S, M, R, op, micro, repeat)


def build_table(
    schedule: str, num_stages: int, num_microbatches: int, num_repeats: int = 1
) -> ScheduleTable:
    if schedule in ("gpipe", "circular"):
        if schedule == "gpipe" and num_repeats != 1:
            raise ConfigError("schedule 'gpipe' takes num_repeats=1; use 'circular' for repeats")
        table = ring_table(schedule, num_stages, num_microbatches, num_repeats)
    elif schedule in SCHEDULES:
        raise ConfigError(f"schedule {schedule!r} has no forward-only ring executor yet")
    else:
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    validate_ring(table)
    return table


def validate_ring(table: ScheduleTable) -> None:
    """Checks a forward-only table against what the ring executor assumes.

    Every (micro-batch, virtual stage) runs exactly once; stage s > 0 runs what stage s - 1 ran
    the tick before; stage 0 starts repeat r + 1 of a micro-batch only after the last stage
    finished its repeat r, and before the last stage's next write to that micro-batch's slot.
    """
    S, M, R = table.num_stages, table.num_microbatches, table.num_repeats
    done = {}
    for t, s in zip(*np.nonzero(table.busy)):
        if table.op[t, s] != FWD:
            _fail(table, t, s, "ring tables hold forward ops only")
        key = (int(table.micro[t, s]), int(table.repeat[t, s]) * S + int(s))
        if key in done:
            _fail(table, t, s, f"micro-batch {key[0]} virtual stage {key[1]} runs twice")
        done[key] = t
        if s > 0:
            prev = (table.micro[t - 1, s - 1], table.repeat[t - 1, s - 1]) if t > 0 else (-1, -1)
            if prev != (table.micro[t, s], table.repeat[t, s]):
                _fail(table, t, s, "stage input is not what the previous stage sent last tick")
    missing = [(m, v) for m in range(M) for v in range(S * R) if (m, v) not in done]
    if missing:
        raise ConfigError(f"schedule {table.name!r} never runs (micro-batch, stage) {missing[:4]}")
    for m in range(M):
        for r in range(1, R):
            if done[(m, r * S)] <= done[(m, r * S - 1)]:
                t = done[(m, r * S)]
                _fail(table, t, 0, f"micro-batch {m} repeat {r} starts before repeat {r - 1} ends")


def _fail(table: ScheduleTable, t: int, s: int, why: str):
    grid = table.ascii().splitlines()
    raise ConfigError(
        f"invalid schedule {table.name!r} at tick {t}, stage {s}: {why}\n" + "\n".join(grid)
    )
