"""Planner CLI: stage sizes for a model on a pipeline, from XLA costs, without allocating weights.

    python -m jaxpipe.plan --model gpt3-175b --stages 8 --microbatches 32 \\
        --device tpu-v5p --method cost [--json]

Runs on a CPU host in well under a minute for the 175B preset (three single-layer compiles from
abstract shapes); prints the per-stage table, or the plan as JSON with --json.
"""

from __future__ import annotations

import argparse
import sys

from jaxpipe import cli
from jaxpipe.config import (
    PRESETS,
    REMAT_MODES,
    SCHEDULES,
    ConfigError,
    PipelineConfig,
    get_preset,
)
from jaxpipe.costs import DEVICES
from jaxpipe.partition import METHODS, make_plan

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
    ap = cli.ArgumentParser(prog="python -m jaxpipe.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small", help=f"preset: {', '.join(PRESETS)}")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--schedule",
        default=None,
        choices=SCHEDULES,
        help="default: gpipe, or circular when --repeats > 1",
    )
    ap.add_argument("--remat", default="none", choices=REMAT_MODES)
    ap.add_argument("--data_parallel", type=int, default=1)
    ap.add_argument("--tensor_parallel", type=int, default=1)
    ap.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="global batch; default microbatches x data_parallel",
    )
    ap.add_argument("--seq_len", type=int, default=None, help="default: the model's max_seq_len")
    ap.add_argument("--device", default="cpu", help=f"one of {', '.join(DEVICES)}")
    ap.add_argument("--method", default="cost", help=f"one of {', '.join(METHODS)}")
    ap.add_argument(
        "--dtype",
        default=None,
        help=f"compute dtype to cost, one of {COMPUTE_DTYPES} (default: bfloat16 on "
        "accelerators, else the model's)",
    )
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap.parse_args(argv)


def compute_dtype(name: str) -> str:
    """`name` if the model can compute in it, else a ConfigError naming the choices."""
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"--dtype {name!r} is not a compute dtype; use one of {COMPUTE_DTYPES}")
    return name


def run(args: argparse.Namespace):
    dtype = args.dtype if args.dtype is not None else ("bfloat16" if args.device != "cpu" else None)
    model_cfg = get_preset(args.model, dtype=None if dtype is None else compute_dtype(dtype))
    schedule = args.schedule or ("circular" if args.repeats > 1 else "gpipe")
    pipe_cfg = PipelineConfig(
        num_stages=args.stages,
        num_microbatches=args.microbatches,
        num_repeats=args.repeats,
        schedule=schedule,
        remat=args.remat,
        data_parallel=args.data_parallel,
        tensor_parallel=args.tensor_parallel,
    )
    batch = args.microbatches * args.data_parallel if args.batch_size is None else args.batch_size
    seq_len = model_cfg.max_seq_len if args.seq_len is None else args.seq_len
    if seq_len < 1:
        raise ConfigError(f"--seq_len must be >= 1, got {seq_len}")
    return make_plan(
        model_cfg, pipe_cfg, args.method, batch_size=batch, seq_len=seq_len, device=args.device
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        plan = run(args)
        print(plan.to_json() if args.json else plan.table())

    return cli.guard(body)


if __name__ == "__main__":
    sys.exit(main())
