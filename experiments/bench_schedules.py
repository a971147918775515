"""1F1B against GPipe: temp memory, step time, and table bubbles against the formulas.

Run (CPU, forces 4 devices; about 2-4 minutes on two cores):
  PYTHONPATH=. python experiments/bench_schedules.py --preset small --layers 4 \
      --stages 4 --microbatches 32 --batch 32 --seq_len 64 --reps 7

Prints one JSON object:
  onef1b_temp_ratio: per-device `memory_analysis().temp_size_in_bytes` of the compiled
    1f1b step over the compiled gpipe step (no remat). Expect <= 0.35 (1f1b stashes ~S
    micro-batches of residuals, gpipe all M).
  onef1b_step_ratio: median 1f1b step time over median gpipe step time, the two run
    alternately. Expect <= 1.10.
  bubble_table_vs_formula: every schedule's table bubble against (S-1)/(R*M+S-1); all true.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import bench_json  # noqa: E402

from jaxpipe import cli  # noqa: E402 (after JAX_PLATFORMS is set)


def bubble_checks(S: int, M: int) -> dict:
    from jaxpipe.schedule import full_table

    out = {}
    for name, R in [("gpipe", 1), ("1f1b", 1), ("circular", 2), ("interleaved_1f1b", 2)]:
        table = full_table(name, S, M, R)
        formula = (S - 1) / (R * M + S - 1)
        out[f"{name}_R{R}"] = {
            "table": table.bubble_fraction(),
            "formula": formula,
            "match": abs(table.bubble_fraction() - formula) < 1e-12,
        }
    return out


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="bench_schedules.py", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument(
        "--xla_defaults",
        action="store_true",
        help="compile with plain jax.jit instead of Pipeline.jit (jaxpipe's XLA options)",
    )
    return p


def measure(args) -> dict:
    """The JSON figures for parsed `args` (JAX must already have >= args.stages devices)."""
    import jax
    import numpy as np

    from jaxpipe import model as M
    from jaxpipe.config import PipelineConfig, get_preset
    from jaxpipe.mesh import make_mesh
    from jaxpipe.pipeline import Pipeline

    devices = jax.devices()[: args.stages]
    print(f"process {jax.process_index()} devices {devices}", file=sys.stderr, flush=True)
    cfg = get_preset(args.preset, num_layers=args.layers)
    params = M.init_params(cfg, 0)
    tokens = jax.random.randint(
        jax.random.key(1), (args.batch, args.seq_len + 1), 0, cfg.vocab_size
    )
    steps, temps = {}, {}
    for schedule in ("gpipe", "1f1b"):
        pcfg = PipelineConfig(
            num_stages=args.stages, num_microbatches=args.microbatches, schedule=schedule
        )
        pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[: args.stages]))
        placed = pipe.place(params)
        jit = jax.jit if args.xla_defaults else pipe.jit
        compiled = jit(pipe.value_and_grad).lower(placed, tokens).compile()
        temps[schedule] = compiled.memory_analysis().temp_size_in_bytes
        jax.block_until_ready(compiled(placed, tokens))
        steps[schedule] = (compiled, placed)
    times = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, (compiled, placed) in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(placed, tokens))
            times[name].append(time.perf_counter() - start)
    median = {name: float(np.median(t)) for name, t in times.items()}
    bubbles = bubble_checks(args.stages, args.microbatches)
    return {
        "config": vars(args),
        "onef1b_temp_ratio": temps["1f1b"] / temps["gpipe"],
        "temp_bytes": temps,
        "onef1b_step_ratio": median["1f1b"] / median["gpipe"],
        "step_seconds_median": median,
        "bubble_table_vs_formula": {
            "all_match": all(b["match"] for b in bubbles.values()),
            **bubbles,
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return bench_json.main_on_cpu_devices(measure, args, args.stages)


if __name__ == "__main__":
    sys.exit(main())
