"""Charts of schedule tables: a Gantt PNG, an ASCII grid for terminals, a Chrome trace.

All three read a `ScheduleTable`; give a `Simulation` to draw simulated seconds instead of
ticks. Forward ops are drawn in a micro-batch's light colour, backward ops in its dark colour
with hatching, and a split table's W ops (weight gradients) in its dark colour with dots.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxpipe import cli
from jaxpipe.config import SCHEDULES, ConfigError
from jaxpipe.schedule import (
    BWD,
    FWD,
    IDLE,
    MAX_CHART_OPS,
    MAX_GRID_TICKS,
    OP_LETTERS,
    SPLIT_SCHEDULES,
    WGT,
    ScheduleTable,
    check_shape,
    full_table,
    in_flight,
)
from jaxpipe.simulate import Simulation


def _spans(table: ScheduleTable, sim: Simulation | None):
    """(stage, start, duration, op, micro, repeat) per op, in ticks or simulated seconds."""
    for t, s in zip(*np.nonzero(table.op != IDLE), strict=True):
        start, dur = (
            (float(t), 1.0) if sim is None else (sim.start[t, s], sim.end[t, s] - sim.start[t, s])
        )
        yield (
            int(s),
            start,
            dur,
            int(table.op[t, s]),
            int(table.micro[t, s]),
            int(table.repeat[t, s]),
        )


def ascii_chart(table: ScheduleTable) -> str:
    """The grid plus a one-line legend and the bubble fraction."""
    legend = "F<m>[.<r>] forward, B<m>[.<r>] backward of micro-batch m (repeat r), . idle"
    if table.split:
        legend = legend.replace("backward", "input gradient, W<m>[.<r>] weight gradients")
    return f"{table.ascii()}\n{legend}; bubble {table.bubble_fraction():.4f}"


def gantt_png(table: ScheduleTable, path: str, sim: Simulation | None = None) -> None:
    """Writes a Gantt chart: one row per stage, one box per op, coloured by micro-batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    S, M = table.num_stages, table.num_microbatches
    cmap = plt.get_cmap("tab20")
    width = table.num_ticks if sim is None else sim.step_time
    fig, ax = plt.subplots(figsize=(min(24, 3 + 0.35 * table.num_ticks), 1 + 0.6 * S))
    for s, start, dur, op, m, r in _spans(table, sim):
        dark = cmap((2 * m) % 20)
        light = cmap((2 * m + 1) % 20)
        ax.barh(
            s,
            dur,
            left=start,
            height=0.8,
            color=light if op == FWD else dark,
            hatch={FWD: None, BWD: "//", WGT: ".."}[op],
            edgecolor="black",
            linewidth=0.4,
        )
        label = f"{m}" if table.num_repeats == 1 else f"{m}.{r}"
        ax.text(start + dur / 2, s, label, ha="center", va="center", fontsize=7)
    ax.set_yticks(range(S), [f"stage {s}" for s in range(S)])
    ax.invert_yaxis()
    ax.set_xlim(0, width)
    ax.set_xlabel("tick" if sim is None else "seconds")
    ax.set_title(
        f"{table.name}: S={S} M={M} R={table.num_repeats}, bubble "
        f"{table.bubble_fraction() if sim is None else sim.bubble_fraction:.3f}"
    )
    handles = [
        Patch(facecolor="white", edgecolor="black", label="forward"),
        Patch(
            facecolor="white",
            edgecolor="black",
            hatch="//",
            label="input gradient" if table.split else "backward",
        ),
    ]
    if table.split:
        handles.append(
            Patch(facecolor="white", edgecolor="black", hatch="..", label="weight gradients")
        )
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def chrome_trace(table: ScheduleTable, path: str, sim: Simulation | None = None) -> dict:
    """Writes a Chrome-trace JSON (opens in Perfetto / chrome://tracing); one thread per stage.

    Without a simulation a tick is drawn as 1 ms.
    """
    scale = 1e3 if sim is None else 1e6  # microseconds per tick / per second
    events = [
        {"ph": "M", "pid": 0, "tid": s, "name": "thread_name", "args": {"name": f"stage {s}"}}
        for s in range(table.num_stages)
    ]
    for s, start, dur, op, m, r in _spans(table, sim):
        kind = {FWD: "forward", BWD: "input gradient" if table.split else "backward"}.get(
            op, "weight gradients"
        )
        events.append(
            {
                "ph": "X",
                "pid": 0,
                "tid": s,
                "ts": start * scale,
                "dur": dur * scale,
                "name": f"{OP_LETTERS[op]}{m}"
                + (f".{r}" if table.num_repeats > 1 else ""),
                "cat": kind,
                "args": {"micro_batch": m, "repeat": r, "op": kind},
            }
        )
    trace = {"traceEvents": events, "displayTimeUnit": "ms"}
    with open(path, "w") as f:
        json.dump(trace, f)
    return trace


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m jaxpipe.schedule", description="Print, chart or trace a schedule table."
    )
    parser.add_argument("--schedule", default="1f1b", choices=SCHEDULES)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--ascii",
        action="store_true",
        help=f"print the grid (the default without --png / --trace, up to {MAX_GRID_TICKS} ticks)",
    )
    parser.add_argument("--png", help=f"write a Gantt chart here (*.png, <= {MAX_CHART_OPS} ops)")
    parser.add_argument("--trace", help="write a Chrome-trace JSON (Perfetto) here")
    args = parser.parse_args(argv)
    return cli.guard(lambda: _run_cli(args))


def _run_cli(args) -> None:
    S, M, R = args.stages, args.microbatches, args.repeats
    check_shape(args.schedule, S, M, R)
    if args.png is not None:
        cli.writable_file(args.png, "--png")
        if Path(args.png).suffix.lower() != ".png":
            raise ConfigError(f"--png {args.png!r} must name a .png file")
        ops = (3 if args.schedule in SPLIT_SCHEDULES else 2) * S * M * R
        if ops > MAX_CHART_OPS:
            raise ConfigError(
                f"--png draws one box per op, at most {MAX_CHART_OPS:,} (about 10 s); this table "
                f"has {ops:,}; use --trace and open it in Perfetto"
            )
    if args.trace is not None:
        cli.writable_file(args.trace, "--trace")
    table = full_table(args.schedule, S, M, R)
    print(
        f"{table.name}: S={table.num_stages} M={table.num_microbatches} R={table.num_repeats} "
        f"ticks={table.num_ticks} bubble={table.bubble_fraction():.4f} "
        f"max stashed={int(in_flight(table).max())}"
    )
    if args.ascii or (not (args.png or args.trace) and table.num_ticks <= MAX_GRID_TICKS):
        print(ascii_chart(table))
    elif not (args.png or args.trace):
        print(f"grid of {table.num_ticks} ticks not printed (over {MAX_GRID_TICKS}); pass --ascii")
    outputs = (("--png", args.png, gantt_png), ("--trace", args.trace, chrome_trace))
    for flag, path, write in outputs:
        if path is None:
            continue
        try:
            write(table, path)
        except OSError as e:
            raise ConfigError(f"cannot write {flag} {path!r}: {e.strerror or e}") from None
        print(f"wrote {path}")
