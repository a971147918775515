"""Static schedule tables: for each tick and stage, which op runs.

A table is the single description of a schedule. The executors index it inside their
`lax.scan`, the validators check it, and the bubble fraction, the simulator (`simulate.py`) and
the charts (`viz.py`) read it. Two kinds exist: forward-only ring tables (`ring_table`, run by
`pipeline.py`, whose backward is JAX's transpose) and forward + backward tables (`full_table`,
any schedule; run by `onef1b.py` for 1f1b, interleaved_1f1b, zb_h1 and zbv).

Ops are F (forward), B (backward) and W (weight gradients). A table either has no W ops, and
each B computes every gradient of its stage (fused), or it has one W per B (split): B computes
only the gradient of the stage input, which the previous stage waits for, and W the weight
gradients, free to run later in what would otherwise be a bubble (zero-bubble schedules, Qi et
al. 2023). What each op waits for is written once, in `op_deps`.

CLI: python -m jaxpipe.schedule --schedule 1f1b --stages 4 --microbatches 8 --ascii
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from jaxpipe.config import FULL_TABLE_SCHEDULES, SCHEDULES, ConfigError

IDLE, FWD, BWD, WGT = 0, 1, 2, 3
OP_LETTERS = ".FBW"
# Tables with split backward ops (B then W); their stash bound counts forwards until their W.
SPLIT_SCHEDULES = ("zb_h1", "zbv")
PLACEMENTS = ("loop", "vee")
NEXT, PREV, SELF = 0, 1, 2  # channels of a value between virtual stages (`ScheduleTable.channel`)
# Tables are built cell by cell in Python (about 5 us per cell on one 2-core host core: a table
# at this bound takes about 5 s with its validation); bigger ones are refused, not built.
MAX_TABLE_CELLS = 1_000_000
MAX_CHART_OPS = 2_048  # the CLI's --png: matplotlib draws about 200 boxes a second
MAX_GRID_TICKS = 400  # the CLI prints longer grids only when asked (--ascii)


def virtual_stage(placement: str, num_stages: int, s, r):
    """Virtual stage that repeat r of stage s holds: r * S + s ("loop"), or with every odd
    repeat reversed, r * S + S - 1 - s ("vee"). Works on numpy and jax integers alike."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"unknown placement {placement!r}; choose one of {PLACEMENTS}")
    if placement == "loop":
        return r * num_stages + s
    return r * num_stages + s + (r % 2) * (num_stages - 1 - 2 * s)


@dataclasses.dataclass(frozen=True, eq=False)
class ScheduleTable:
    """op/micro/repeat are [ticks, stages] arrays; micro and repeat are -1 where op is IDLE.

    `placement` says which device holds virtual stage v: "loop" puts repeat r of stage s at
    v = r * S + s (the layer groups go round the ring R times); "vee" reverses every odd repeat,
    v = r * S + S - 1 - s, so with R = 2 device d holds virtual stages d and 2S - 1 - d and the
    last forward and first backward stay on one device (ZB-V).
    """

    name: str
    num_stages: int
    num_microbatches: int
    num_repeats: int
    op: np.ndarray
    micro: np.ndarray
    repeat: np.ndarray
    # Ticks from a stage's op to the next stage's first use of its output: 1 when a tick ends
    # with the send; 2 when each send is spread over the next tick, overlapping its compute.
    hop: int = 1
    placement: str = "loop"

    def virtual_stage(self, s, r):
        """Virtual stage that repeat r of stage s runs (numpy or jax integers alike)."""
        return virtual_stage(self.placement, self.num_stages, s, r)

    def device_of(self, v: int) -> tuple[int, int]:
        """(stage, repeat) holding virtual stage v."""
        r, i = divmod(int(v), self.num_stages)
        return (self.num_stages - 1 - i if self.placement == "vee" and r % 2 else i), r

    def channel(self, src_v: int, dst_v: int) -> int:
        """How a value moves from virtual stage src_v's device to dst_v's: NEXT (ring i -> i + 1),
        PREV (ring i + 1 -> i) or SELF (the same device, at the turn of a V)."""
        src, dst = self.device_of(src_v)[0], self.device_of(dst_v)[0]
        if src == dst:
            return SELF
        return NEXT if dst == (src + 1) % self.num_stages else PREV

    @property
    def explicit_backward(self) -> bool:
        """The table holds the backward ops, which its executor runs tick by tick; a forward-only
        (ring) table's backward is autodiff of its forward loop, the same ticks in reverse."""
        return bool((self.op == BWD).any())

    @property
    def split(self) -> bool:
        """B computes only the stage-input gradient and a W op the weight gradients."""
        return bool((self.op == WGT).any())

    @property
    def num_ticks(self) -> int:
        return self.op.shape[0]

    @property
    def busy(self) -> np.ndarray:
        return self.op != IDLE

    def bubble_fraction(self) -> float:
        """Idle share of all (tick, stage) slots, every forward and every backward one tick.

        A forward-only ring table stands for itself plus its mirrored backward, which has the
        same idle share; a forward + backward table counts both halves.
        """
        return 1.0 - float(self.busy.sum()) / self.op.size

    def cell(self, t: int, s: int) -> str:
        o = self.op[t, s]
        if o == IDLE:
            return "."
        rep = f".{self.repeat[t, s]}" if self.num_repeats > 1 else ""
        return f"{OP_LETTERS[o]}{self.micro[t, s]}{rep}"

    def ascii(self, mark: tuple[int, int] | None = None) -> str:
        """One row per stage; cells are `F<m>.<r>` / `B<m>.<r>` / `W<m>.<r>` or `.`; `mark` is
        bracketed."""
        cells = [[self.cell(t, s) for t in range(self.num_ticks)] for s in range(self.num_stages)]
        if mark is not None:
            t, s = mark
            cells[s][t] = f"[{cells[s][t]}]"
        width = max(len(c) for row in cells for c in row)
        return "\n".join(
            f"stage {s}: " + " ".join(c.rjust(width) for c in row) for s, row in enumerate(cells)
        )


def _ring_period(S: int, M: int, R: int, hop: int) -> int:
    return max(M, hop * S) if R > 1 else M


def ring_table(
    name: str, num_stages: int, num_microbatches: int, num_repeats: int, hop: int = 1
):
    """GPipe (R = 1) and circular GPipe (R > 1): stage s runs item i = t - hop * s at tick t.

    Item i is micro-batch i mod M' of repeat i // M', where M' = max(M, hop * S) when R > 1 so
    that a micro-batch leaving the last stage is back on stage 0 before its next repeat is due;
    slots with micro-batch >= M are idle. With hop = 2 a stage's output is sent during the next
    tick, overlapping its compute, and used the tick after: S - 1 more ticks of fill and drain.
    """
    S, M, R = num_stages, num_microbatches, num_repeats
    if hop not in (1, 2):
        raise ConfigError(f"hop must be 1 or 2 ticks, got {hop!r}")
    check_size(name, S, M, R, ring=True, hop=hop)
    period = _ring_period(S, M, R, hop)
    T = R * period + hop * (S - 1)
    op = np.full((T, S), IDLE, np.int8)
    micro = -np.ones((T, S), np.int32)
    repeat = -np.ones((T, S), np.int32)
    for t in range(T):
        for s in range(S):
            i = t - hop * s
            if 0 <= i < R * period and i % period < M:
                op[t, s], micro[t, s], repeat[t, s] = FWD, i % period, i // period
    return ScheduleTable(name, S, M, R, op, micro, repeat, hop)


def trains_on_ring(schedule: str, hop: int) -> bool:
    """Whether a training step autodiffs the forward-only ring table (gpipe and circular with
    overlapped sends, hop 2) instead of running a forward + backward table."""
    return schedule in ("gpipe", "circular") and hop != 1


def build_table(
    schedule: str, num_stages: int, num_microbatches: int, num_repeats: int = 1, hop: int = 1
) -> ScheduleTable:
    if schedule in ("gpipe", "circular"):
        if schedule == "gpipe" and num_repeats != 1:
            raise ConfigError("schedule 'gpipe' takes num_repeats=1; use 'circular' for repeats")
        if not trains_on_ring(schedule, hop):
            return full_table(schedule, num_stages, num_microbatches, num_repeats)
        table = ring_table(schedule, num_stages, num_microbatches, num_repeats, hop)
    elif schedule in FULL_TABLE_SCHEDULES:
        _check_hop(schedule, hop)
        return full_table(schedule, num_stages, num_microbatches, num_repeats)
    else:
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    validate_ring(table)
    return table


def _check_hop(schedule: str, hop: int) -> None:
    if hop != 1:
        raise ConfigError(
            f"schedule {schedule!r} sends within the tick (hop 1); overlapped sends (hop 2) "
            f"run with 'gpipe' or 'circular'"
        )


def validate_ring(table: ScheduleTable) -> None:
    """Checks a forward-only table against what the ring executor assumes.

    Every (micro-batch, virtual stage) runs exactly once; stage s > 0 runs what stage s - 1 ran
    `hop` ticks before; stage 0 starts repeat r + 1 of a micro-batch only `hop` ticks or more
    after the last stage finished its repeat r.
    """
    S, M, R, hop = table.num_stages, table.num_microbatches, table.num_repeats, table.hop
    done = {}
    for t, s in zip(*np.nonzero(table.busy), strict=True):
        if table.op[t, s] != FWD:
            _fail(table, t, s, "ring tables hold forward ops only")
        key = (int(table.micro[t, s]), int(table.repeat[t, s]) * S + int(s))
        if key in done:
            _fail(table, t, s, f"micro-batch {key[0]} virtual stage {key[1]} runs twice")
        done[key] = t
        if s > 0:
            a = t - hop
            prev = (table.micro[a, s - 1], table.repeat[a, s - 1]) if a >= 0 else (-1, -1)
            if prev != (table.micro[t, s], table.repeat[t, s]):
                _fail(table, t, s, f"stage input is not what the previous stage sent {hop} "
                      f"tick(s) before")
    missing = [(m, v) for m in range(M) for v in range(S * R) if (m, v) not in done]
    if missing:
        raise ConfigError(f"schedule {table.name!r} never runs (micro-batch, stage) {missing[:4]}")
    for m in range(M):
        for r in range(1, R):
            if done[(m, r * S)] < done[(m, r * S - 1)] + hop:
                t = done[(m, r * S)]
                _fail(table, t, 0, f"micro-batch {m} repeat {r} starts before repeat {r - 1} ends")


# -- forward + backward tables -------------------------------------------------------------------

Op = tuple[int, int, int]  # (FWD, BWD or WGT, micro-batch, repeat)
Key = tuple[int, int, int]  # (FWD, BWD or WGT, micro-batch, virtual stage)


def op_deps(op: int, micro: int, v: int, num_virtual: int) -> list[Key]:
    """What an op consumes, as the ops producing it: the forward of virtual stage v needs the
    forward of v - 1; the backward of v needs the forward of v and the backward of v + 1; W needs
    its own B. Every builder, check, simulation and buffer plan reads dependencies from here."""
    if op == FWD:
        return [(FWD, micro, v - 1)] if v > 0 else []
    if op == BWD:
        return [(FWD, micro, v)] + ([(BWD, micro, v + 1)] if v < num_virtual - 1 else [])
    return [(BWD, micro, v)]


def unmet_dep(done: dict[Key, int], t: int, key: Key, num_virtual: int) -> Key | None:
    """The first input of `key` not produced before tick t (`done`: key -> tick), or None."""
    for d in op_deps(*key, num_virtual):
        if done.get(d, t) >= t:
            return d
    return None


def stage_orders(schedule: str, num_stages: int, num_microbatches: int, num_repeats: int = 1):
    """The forward / backward order each stage follows, as a list per stage of (op, micro-batch,
    repeat); split schedules' W ops are placed by `table_from_orders`.

    gpipe / circular: every forward (repeat-major), then every backward in reverse repeat order.
    1f1b (PipeDream-flush) and zb_h1: S - s - 1 warm-up forwards, then one forward / one
    backward, then the remaining backwards. interleaved_1f1b (Megatron): micro-batches in groups
    of S, each group visiting the R virtual stages of a device in turn; 2 (S - s - 1) + (R - 1) S
    warm-up forwards. zbv has no fixed order: `zbv_table` picks each op when it is ready.
    """
    S, M, R = num_stages, num_microbatches, num_repeats
    if schedule in ("gpipe", "circular"):
        fwd = [(FWD, m, r) for r in range(R) for m in range(M)]
        bwd = [(BWD, m, r) for r in reversed(range(R)) for m in range(M)]
        return [fwd + bwd for _ in range(S)]
    if schedule in ("1f1b", "zb_h1") or (schedule == "interleaved_1f1b" and R == 1):
        fwd = [(FWD, m, 0) for m in range(M)]
        bwd = [(BWD, m, 0) for m in range(M)]
        return [_one_f_one_b(fwd, bwd, min(S - s - 1, M)) for s in range(S)]
    if schedule == "interleaved_1f1b":
        if M % S:
            raise ConfigError(
                f"interleaved_1f1b runs micro-batches in groups of num_stages: num_microbatches "
                f"{M} must be a multiple of num_stages {S}; try {S * max(1, round(M / S))}"
            )
        group = S * R

        def item(k, backward):
            r = (k % group) // S
            return (
                BWD if backward else FWD,
                (k // group) * S + k % S,
                R - 1 - r if backward else r,
            )

        fwd = [item(k, False) for k in range(R * M)]
        bwd = [item(k, True) for k in range(R * M)]
        return [_one_f_one_b(fwd, bwd, min(2 * (S - s - 1) + (R - 1) * S, R * M)) for s in range(S)]
    raise ConfigError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")


def _one_f_one_b(fwd: list[Op], bwd: list[Op], warmup: int) -> list[Op]:
    order = list(fwd[:warmup])
    for f, b in zip(fwd[warmup:], bwd, strict=False):
        order += [f, b]
    return order + bwd[len(fwd) - warmup :]


def table_from_orders(
    name: str, num_stages, num_microbatches, num_repeats, orders, hold=None, placement="loop"
) -> ScheduleTable:
    """Places each stage's ops at the earliest tick their inputs allow (one op per tick).

    `orders` is a list per stage of forward / backward ops, or a function (stage, ready, ran) ->
    the op the stage runs next, or None, given `ready(op)` and `ran(op)`. With `hold`, the table
    is split: every B gets a W, which a stage runs (oldest first) when its next op is not ready,
    or when that op is a forward and the stage already holds `hold` stashes (forwards whose W
    has not run); a stage holding `hold` stashes and no pending W waits.
    """
    S, M, R = num_stages, num_microbatches, num_repeats
    V = S * R
    shape = ScheduleTable(name, S, M, R, np.zeros((0, S), np.int8), None, None, 1, placement)
    done: dict[Key, int] = {}
    pending: list[list[Op]] = [[] for _ in range(S)]
    held = [0] * S
    rows: list[list[Op | None]] = []
    t = 0
    if callable(orders):
        pick, total = orders, 3 * S * M * R if hold is not None else 2 * S * M * R
    else:
        nxt = [0] * S
        total = sum(len(o) for o in orders) * (2 if hold is None else 3) // 2

        def pick(s, ready, ran):
            return orders[s][nxt[s]] if nxt[s] < len(orders[s]) else None

    def key(s, op: Op) -> Key:
        return (op[0], op[1], int(shape.virtual_stage(s, op[2])))

    while len(done) < total:
        row: list[Op | None] = [None] * S
        for s in range(S):
            op = pick(
                s,
                lambda op, s=s, t=t: unmet_dep(done, t, key(s, op), V) is None,
                lambda op, s=s: key(s, op) in done,
            )
            ready = op is not None and unmet_dep(done, t, key(s, op), V) is None
            full = hold is not None and op is not None and op[0] == FWD and held[s] >= hold
            if ready and not full:
                row[s] = op
            elif pending[s]:
                row[s] = pending[s].pop(0)
        for s, op in enumerate(row):
            if op is None:
                continue
            done[key(s, op)] = t
            if not callable(orders) and op[0] != WGT:
                nxt[s] += 1
            held[s] += 1 if op[0] == FWD else -1 if op[0] == (BWD if hold is None else WGT) else 0
            if op[0] == BWD and hold is not None:
                pending[s].append((WGT, op[1], op[2]))
        rows.append(row)
        t += 1
        if t > 4 * total + 4 * S:
            raise ConfigError(f"schedule {name!r} deadlocks: stages wait on each other forever")
    op = np.array([[c[0] if c else IDLE for c in row] for row in rows], np.int8).reshape(-1, S)
    micro = np.array([[c[1] if c else -1 for c in row] for row in rows], np.int32).reshape(-1, S)
    repeat = np.array([[c[2] if c else -1 for c in row] for row in rows], np.int32).reshape(-1, S)
    return ScheduleTable(name, S, M, R, op, micro, repeat, 1, placement)


def zbv_table(num_stages: int, num_microbatches: int) -> ScheduleTable:
    """ZB-V: two virtual stages per device in a V (device d holds d and 2S - 1 - d), split
    backward. Each tick a device runs a ready backward (the deeper virtual stage first), else a
    ready forward (deeper first) while it holds fewer than 2 S half-stage stashes (1F1B's memory),
    else its oldest pending W."""
    S, M = num_stages, num_microbatches
    first: dict[tuple[int, int, int], int] = {}  # (stage, op, repeat) -> lowest m not yet run

    def pick(s, ready, ran):
        for o in (BWD, FWD):
            for r in (1, 0):  # repeat 1 holds the deeper virtual stage on every device
                m = first.get((s, o, r), 0)
                while m < M and ran((o, m, r)):
                    m += 1
                first[(s, o, r)] = m
                if m < M and ready((o, m, r)):
                    return (o, m, r)
        return None

    return table_from_orders("zbv", S, M, 2, pick, stash_bound("zbv", S, M, 2), "vee")


def full_table(
    schedule: str, num_stages: int, num_microbatches: int, num_repeats: int = 1
) -> ScheduleTable:
    """Forward and backward table of any schedule, validated against its stash bound."""
    check_shape(schedule, num_stages, num_microbatches, num_repeats)
    bound = stash_bound(schedule, num_stages, num_microbatches, num_repeats)
    if schedule == "zbv":
        table = zbv_table(num_stages, num_microbatches)
    else:
        orders = stage_orders(schedule, num_stages, num_microbatches, num_repeats)
        hold = bound if schedule in SPLIT_SCHEDULES else None
        table = table_from_orders(
            schedule, num_stages, num_microbatches, num_repeats, orders, hold
        )
    validate(table, bound)
    return table


def executor_table(
    schedule: str, num_stages: int, num_microbatches: int, num_repeats: int = 1, hop: int = 1
) -> ScheduleTable:
    """The forward + backward table that jaxpipe's executor for `schedule` runs, tick by tick.

    Every schedule runs its `full_table` (`build_table`), except gpipe and circular with
    overlapped sends (hop 2): those run the ring table forward, and autodiff runs the same
    ticks in reverse for the backward, so their table is the ring table followed by its mirror
    image of backward ops (what every stage holds in flight and how long a step takes follow
    from it, as for the other schedules).
    """
    ring = build_table(schedule, num_stages, num_microbatches, num_repeats, hop)
    if not trains_on_ring(schedule, hop):
        return ring  # the forward + backward table itself
    back = np.where(ring.op[::-1] == FWD, BWD, IDLE).astype(np.int8)
    table = ScheduleTable(
        schedule,
        ring.num_stages,
        ring.num_microbatches,
        ring.num_repeats,
        np.concatenate([ring.op, back]),
        np.concatenate([ring.micro, ring.micro[::-1]]),
        np.concatenate([ring.repeat, ring.repeat[::-1]]),
        ring.hop,
    )
    validate(table)
    return table


def stash_bound(schedule: str, num_stages: int, num_microbatches: int, num_repeats: int) -> int:
    """Most forwards a stage may hold (until their backward, or their W in split tables): all of
    them for GPipe, S for 1F1B and ZB-H1, the warm-up plus one for interleaved 1F1B, 2 S for ZB-V
    (counted in virtual-stage units: 1F1B's memory, as each holds half a stage)."""
    S, M, R = num_stages, num_microbatches, num_repeats
    if schedule in ("1f1b", "zb_h1") or (schedule == "interleaved_1f1b" and R == 1):
        return min(S, M)
    if schedule == "interleaved_1f1b":
        return min(2 * (S - 1) + (R - 1) * S + 1, R * M)
    if schedule == "zbv":
        return 2 * min(S, M)
    return R * M


def check_shape(schedule, S, M, R):
    """Raises naming the fix when a table of this schedule and shape cannot be built."""
    if min(S, M, R) < 1:
        raise ConfigError(f"stages, micro-batches and repeats must be >= 1, got {S}, {M}, {R}")
    if schedule in ("gpipe", "1f1b", "zb_h1") and R != 1:
        raise ConfigError(
            f"schedule {schedule!r} runs each stage once (num_repeats=1), got {R}; use "
            f"{'circular' if schedule == 'gpipe' else 'interleaved_1f1b or zbv'} for repeats"
        )
    if schedule == "zbv" and R != 2:
        raise ConfigError(
            f"schedule 'zbv' places two virtual stages on each device (num_repeats=2), got {R}"
        )
    check_size(schedule, S, M, R, ring=False)


def table_cells(S: int, M: int, R: int, ring: bool, hop: int = 1, split: bool = False) -> int:
    """Ticks x stages of a table: exact for a ring table, the least possible for a forward +
    backward one (2 R M ops per stage, 3 R M when split, plus the fill and the drain)."""
    if ring:
        return S * (R * _ring_period(S, M, R, hop) + hop * (S - 1))
    return S * ((3 if split else 2) * R * M + 2 * (S - 1))


def check_size(schedule: str, S: int, M: int, R: int, ring: bool, hop: int = 1) -> None:
    """Refuses tables above `MAX_TABLE_CELLS` instead of spending minutes building them."""
    if min(S, M, R) < 1:
        raise ConfigError(f"stages, micro-batches and repeats must be >= 1, got {S}, {M}, {R}")
    cells = table_cells(S, M, R, ring, hop, schedule in SPLIT_SCHEDULES)
    if cells > MAX_TABLE_CELLS:
        raise ConfigError(
            f"schedule {schedule!r} with {S} stages, {M} micro-batches and {R} repeats needs a "
            f"table of {cells:,} (tick, stage) cells, over the limit of {MAX_TABLE_CELLS:,} "
            f"(about 5 s to build); use fewer stages, micro-batches or repeats"
        )


def in_flight(table: ScheduleTable) -> np.ndarray:
    """[ticks, stages]: forwards whose stash is held after each tick (until their backward, or
    until their W in a split table)."""
    release = WGT if table.split else BWD
    return np.cumsum((table.op == FWD).astype(np.int32) - (table.op == release), axis=0)


def pending_weight_grads(table: ScheduleTable) -> np.ndarray:
    """[ticks, stages]: backwards whose W has not run yet after each tick (all zero unless the
    table is split): what B leaves for W is held meanwhile."""
    return np.cumsum((table.op == BWD).astype(np.int32) * table.split - (table.op == WGT), axis=0)


def op_ticks(table: ScheduleTable) -> dict[Key, int]:
    """(op, micro-batch, virtual stage) -> the tick it runs at."""
    return {
        (int(table.op[t, s]), int(table.micro[t, s]),
         int(table.virtual_stage(int(s), int(table.repeat[t, s])))): int(t)
        for t, s in zip(*np.nonzero(table.busy), strict=True)
    }


def sends(table: ScheduleTable) -> dict[int, np.ndarray]:
    """{FWD: [3, ticks] bool, BWD: the same}: whether the tick's forward outputs (activations)
    or backward outputs (gradients) go out on each channel (`NEXT`, `PREV`, `SELF`), because
    some op consumes them from there at a later tick. The same for every stage, so a send
    taken only on these ticks stays a matched collective."""
    V = table.num_stages * table.num_repeats
    out = {o: np.zeros((3, table.num_ticks), bool) for o in (FWD, BWD)}
    at = op_ticks(table)
    for (o, m, v) in at:
        for d in op_deps(o, m, v, V):
            if d[0] == o and d in at:
                out[o][table.channel(d[2], v), at[d]] = True
    return out


def crossing_ticks(table: ScheduleTable) -> np.ndarray:
    """[ticks] bool: ticks that end with some value crossing to another stage (an F's output
    to the next virtual stage's device, a B's to the previous one's): the points where the SPMD
    executor's stages meet. Values kept on a device (the turn of a V) cross nothing."""
    return np.any([a[[NEXT, PREV]].any(axis=0) for a in sends(table).values()], axis=0)


def fused_backward(table: ScheduleTable) -> np.ndarray:
    """[ticks, stages] bool: the B and W cells of a split table that the executor runs together
    at the B's tick, W on the carry as B made it (nothing at the W's).

    A pair fuses when the W is its stage's next op and no tick from the B's up to the one before
    the W's ends with a value crossing between stages (`crossing_ticks`): the stage then does the
    same work before the same meeting point, so the schedule is unchanged, while B's carry
    (the output cotangents it would leave W in the stash) is never written nor read back. The
    first virtual stage's B sends nothing, so in ZB-H1 its pairs fuse wherever no other stage
    sends meanwhile (every pair of the first stage at S = 2).

    Pairs fuse only where they are at least a stage's worth (1/S of the table's pairs): the
    executor's conditional for them is part of every device's program, its temporaries (B's
    carry, held until W takes it) with it. At S >= 4 one pair of the whole table could fuse
    (the last micro-batch's, on one stage); it does not (compiled for v5p:4x4x4, it took
    llama-3-70b's zb_h1 step at S = 16 from 81.6 to 82.3 GiB)."""
    fused = np.zeros(table.op.shape, bool)
    if not table.split:
        return fused
    crossing = crossing_ticks(table)
    for s in range(table.num_stages):
        busy = np.flatnonzero(table.busy[:, s])
        for t, u in zip(busy[:-1], busy[1:], strict=True):
            if (
                table.op[t, s] == BWD
                and table.op[u, s] == WGT
                and table.micro[t, s] == table.micro[u, s]
                and table.repeat[t, s] == table.repeat[u, s]
                and not crossing[t:u].any()
            ):
                fused[t, s] = fused[u, s] = True
    if (fused & (table.op == BWD)).sum() * table.num_stages < (table.op == BWD).sum():
        fused[:] = False
    return fused


def validate(table: ScheduleTable, max_in_flight: int | None = None) -> None:
    """Checks a forward + backward table; raises ConfigError with the grid and the bad cell.

    Every forward and backward of every (micro-batch, virtual stage) runs exactly once (and its
    W too in a split table), each after its inputs (`op_deps`) were produced at an earlier tick,
    and no stage holds more than `max_in_flight` stashed forwards (default: no bound).
    """
    S, M, R = table.num_stages, table.num_microbatches, table.num_repeats
    V = S * R
    done: dict[Key, int] = {}
    for t, s in zip(*np.nonzero(table.busy), strict=True):
        o, m, r = int(table.op[t, s]), int(table.micro[t, s]), int(table.repeat[t, s])
        if not (0 <= m < M and 0 <= r < R) or o not in (FWD, BWD, WGT):
            _fail(table, t, s, f"op {o}, micro-batch {m} / repeat {r} out of range")
        v = int(table.virtual_stage(int(s), r))
        if (o, m, v) in done:
            _fail(table, t, s, f"{OP_LETTERS[o]} micro-batch {m} virtual stage {v} runs twice")
        d = unmet_dep(done, t, (o, m, v), V)
        if d is not None:
            _fail(
                table, t, s, f"runs before {OP_LETTERS[d[0]]} of micro-batch {m} at virtual "
                f"stage {d[2]}"
            )
        done[(o, m, v)] = t
    for o in (FWD, BWD, WGT) if table.split else (FWD, BWD):
        missing = [(m, v) for m in range(M) for v in range(V) if (o, m, v) not in done]
        if missing:
            raise ConfigError(
                f"schedule {table.name!r} never runs {OP_LETTERS[o]} of (micro-batch, virtual "
                f"stage) {missing[:4]}\n{table.ascii()}"
            )
    if max_in_flight is not None:
        over = np.argwhere(in_flight(table) > max_in_flight)
        if len(over):
            t, s = over[0]
            _fail(table, t, s, f"more than {max_in_flight} stashed forwards on the stage")


def _fail(table: ScheduleTable, t: int, s: int, why: str):
    raise ConfigError(
        f"invalid schedule {table.name!r} at tick {t}, stage {s} (bracketed): {why}\n"
        + table.ascii(mark=(int(t), int(s)))
    )


if __name__ == "__main__":  # the command lives with the charts it draws
    from jaxpipe.viz import main

    sys.exit(main())
