"""Planner CLI: stage sizes for a model on a pipeline, from XLA costs, without allocating weights.

    python -m jaxpipe.plan --model gpt3-175b --stages 8 --microbatches 32 \\
        --device tpu-v5p --method cost [--json]

Runs on a CPU host in well under a minute for the 175B preset (three single-layer compiles from
abstract shapes); prints the per-stage table, or the plan as JSON with --json.

With --aot --topology v5p:4x4x4 (or cpu:N) it compiles the whole training step for that
topology instead, from abstract shapes, and prints the compiler's per-device memory next to the
planner's prediction (`jaxpipe.aot`):

    python -m jaxpipe.plan --aot --model llama-3-70b --topology v5p:4x4x4 --data 4 --pipe 8 \\
        --tensor 2 --schedule 1f1b --microbatches 16 --global_batch 256 --seq_len 4096 \\
        --remat layer [--attention splash] [--json]

With --auto it searches the mesh, schedule, repeats, micro-batches, remat, the state split over
`data` (replicated, ZeRO-1, FSDP; --zero1 or --fsdp searches only that one) and layer split for
--devices devices instead (`jaxpipe.autotune`), and prints the fastest that fit with the
train_lm.py command of the best (about 30 s for this one on a 2-core host):

    python -m jaxpipe.plan --auto --model llama-3-70b --devices 64 --devices_per_node 8 \\
        --device h100 --global_batch 512 --seq_len 8192 [--memory_gib 80] [--top 10] [--json]

For a TPU device (--device tpu-v5p, ...) with libtpu installed, the layers are compiled for a
compile-only chip of that generation (`topology.costing_target`), and --attention splash plans
for the fused kernel there. With --topology too (v5p:4x4x4, or cpu:N) it compiles the best
candidates' whole training steps for it, best first, until one fits the memory per device
(at most --verify of them, default 3; `jaxpipe.verify`), and names that one best; --devices
and --device then default to the topology's (64 and tpu-v5p for v5p:4x4x4):

    python -m jaxpipe.plan --auto --model llama-3-70b --topology v5p:4x4x4 \
        --global_batch 256 --seq_len 4096 --memory_gib 85

With --time K it runs the training steps of the first K candidates on the devices present
instead (they must be the cluster's: --devices of the --device's platform; with --device cpu,
that many CPU devices are forced) and ranks them by the measured step (`jaxpipe.trial`):

    python -m jaxpipe.plan --auto --model small --devices 4 --global_batch 16 --seq_len 128 \
        --time 3
"""

from __future__ import annotations

import argparse
import sys

from jaxpipe import aot, autotune, cli, topology
from jaxpipe.attention import check_kernel, compiling_for
from jaxpipe.config import (
    ATTENTION_KERNELS,
    PRESETS,
    REMAT_MODES,
    SCHEDULES,
    ConfigError,
    PipelineConfig,
    get_preset,
)
from jaxpipe.costs import DEVICES
from jaxpipe.partition import METHODS, make_plan
from jaxpipe.trial import Trial, trial
from jaxpipe.verify import DEFAULT_COUNT, Verification, verify

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
    ap = cli.ArgumentParser(prog="python -m jaxpipe.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small", help=f"preset: {', '.join(PRESETS)}")
    ap.add_argument("--stages", "--pipe", dest="stages", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--schedule",
        default=None,
        choices=SCHEDULES,
        help="default: gpipe, or circular when --repeats > 1",
    )
    ap.add_argument("--remat", default="none", choices=REMAT_MODES)
    ap.add_argument("--data_parallel", "--data", dest="data_parallel", type=int, default=1)
    ap.add_argument("--tensor_parallel", "--tensor", dest="tensor_parallel", type=int, default=1)
    ap.add_argument(
        "--embed_head",
        default=None,
        choices=("outside", "inside"),
        help="where the embedding and head run (PipelineConfig.embed_head); default: charged "
        "to the first and last stage by the planner, the trainer's default (outside) with --aot",
    )
    ap.add_argument(
        "--batch_size",
        "--global_batch",
        dest="batch_size",
        type=int,
        default=None,
        help="global batch; default microbatches x data_parallel",
    )
    ap.add_argument("--seq_len", type=int, default=None, help="default: the model's max_seq_len")
    ap.add_argument(
        "--max_seq_len",
        type=int,
        default=None,
        help="the model's longest sequence (ModelConfig.max_seq_len); default: the preset's",
    )
    ap.add_argument(
        "--attention",
        default="xla",
        choices=ATTENTION_KERNELS,
        help="attention kernel (ModelConfig.attention): xla anywhere, cudnn on NVIDIA GPUs, "
        "splash (Pallas) on TPUs or with --aot for a TPU topology",
    )
    ap.add_argument("--zero1", action="store_true", help="AdamW moments split over `data`")
    ap.add_argument(
        "--fsdp", action="store_true", help="block parameters split over `data` too"
    )
    ap.add_argument(
        "--overlap_sends",
        action="store_true",
        help="gpipe/circular: send each stage output during the next tick's compute",
    )
    ap.add_argument(
        "--device",
        default=None,
        help=f"one of {', '.join(DEVICES)} (default: cpu, or the --topology's chip with --aot)",
    )
    ap.add_argument(
        "--method",
        default=None,
        help=f"one of {', '.join(METHODS)} (default: cost, or uniform with --aot: the "
        "trainer's default layout)",
    )
    ap.add_argument(
        "--dtype",
        default=None,
        help=f"compute dtype to cost, one of {COMPUTE_DTYPES} (default: bfloat16 on "
        "accelerators, else the model's)",
    )
    ap.add_argument(
        "--aot",
        action="store_true",
        help="compile the whole training step for --topology and report its memory",
    )
    ap.add_argument(
        "--topology",
        default=None,
        help="with --aot: a TPU slice such as v5p:4x4x4 (needs the tpu extra) or cpu:N; "
        "with --auto: compile the best candidates for it until one fits",
    )
    ap.add_argument(
        "--verify", type=int, default=None,
        help=f"with --auto --topology: candidates compiled at most (default {DEFAULT_COUNT})",
    )
    ap.add_argument(
        "--time", type=int, default=None,
        help="with --auto: run the first TIME candidates' steps on the devices present and "
        "rank them by the measured step",
    )
    ap.add_argument(
        "--auto",
        action="store_true",
        help="search the fastest configuration for --devices devices (jaxpipe.autotune)",
    )
    ap.add_argument("--devices", type=int, default=None, help="with --auto: devices to plan for")
    ap.add_argument(
        "--devices_per_node", type=int, default=None, help="default: the --device profile's"
    )
    ap.add_argument("--memory_gib", type=float, default=None, help="memory per device")
    ap.add_argument("--top", type=int, default=10, help="with --auto: candidates to print")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    return ap.parse_args(argv)


def compute_dtype(name: str) -> str:
    """`name` if the model can compute in it, else a ConfigError naming the choices."""
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"--dtype {name!r} is not a compute dtype; use one of {COMPUTE_DTYPES}")
    return name


def run(args: argparse.Namespace):
    """The plan, with --aot the compiled step's `aot.AotReport`, with --auto the search's
    `autotune.AutotuneResult` (with --topology too, its `verify.Verification`; with --time,
    its `trial.Trial`)."""
    if args.auto:
        return _auto(args)
    device = args.device or (topology.profile_name(args.topology) if args.aot else "cpu")
    method = args.method or ("uniform" if args.aot else "cost")
    dtype = args.dtype if args.dtype is not None else ("bfloat16" if device != "cpu" else None)
    model_cfg = get_preset(
        args.model, dtype=None if dtype is None else compute_dtype(dtype),
        attention=args.attention, max_seq_len=args.max_seq_len,
    )
    schedule = args.schedule or ("circular" if args.repeats > 1 else "gpipe")
    embed_head = {} if args.embed_head is None else {"embed_head": args.embed_head}
    pipe_cfg = PipelineConfig(
        num_stages=args.stages,
        num_microbatches=args.microbatches,
        num_repeats=args.repeats,
        schedule=schedule,
        remat=args.remat,
        data_parallel=args.data_parallel,
        tensor_parallel=args.tensor_parallel,
        zero1=args.zero1,
        fsdp=args.fsdp,
        overlap_sends=args.overlap_sends,
        **embed_head,
    )
    batch = args.microbatches * args.data_parallel if args.batch_size is None else args.batch_size
    seq_len = model_cfg.max_seq_len if args.seq_len is None else args.seq_len
    if seq_len < 1:
        raise ConfigError(f"--seq_len must be >= 1, got {seq_len}")
    if args.aot:
        return aot.compile_step(model_cfg, pipe_cfg, batch_size=batch, seq_len=seq_len,
                                topology=args.topology, method=method, device=device)
    inside = {} if args.embed_head is None else {
        "embed_in_first": args.embed_head == "inside", "head_in_last": args.embed_head == "inside"
    }
    return make_plan(
        model_cfg, pipe_cfg, method, batch_size=batch, seq_len=seq_len, device=device, **inside
    )


def _auto(args: argparse.Namespace) -> autotune.AutotuneResult | Verification | Trial:
    if args.aot:
        raise ConfigError("--auto and --aot are separate modes; drop one of them")
    devices, device = args.devices, args.device
    topo = None if args.topology is None else topology.get_topology(args.topology)
    if topo is not None:  # by default, plan for the topology's devices and chips
        devices = devices or len(topo.devices)
        device = device or topology.profile_name(args.topology)
    if devices is None:
        raise ConfigError("--auto needs --devices, the number of devices to plan for (or "
                          "--topology, whose devices it then plans for)")
    device = device or "cpu"
    dtype = args.dtype if args.dtype is not None else ("bfloat16" if device != "cpu" else None)
    model_cfg = get_preset(
        args.model, dtype=None if dtype is None else compute_dtype(dtype),
        attention=args.attention, max_seq_len=args.max_seq_len,
    )
    seq_len = model_cfg.max_seq_len if args.seq_len is None else args.seq_len
    if args.batch_size is None:
        raise ConfigError("--auto needs --global_batch, the sequences per step")
    cluster = autotune.Cluster(devices, device, args.devices_per_node, args.memory_gib)
    chip, platform = topology.costing_target(device)
    if model_cfg.attention == "splash" and platform != "tpu" and topology.chip_topology(device):
        raise ConfigError(
            f"--attention splash on {device} is costed by compiling for a TPU chip, which needs "
            f"libtpu; install it with {topology.TPU_EXTRA}, or plan with --attention xla"
        )
    with compiling_for(platform):  # e.g. the splash kernel traces for a compile-only TPU chip
        check_kernel(model_cfg, seq_len)
        result = autotune.search(
            model_cfg, cluster, global_batch=args.batch_size, seq_len=seq_len, top=args.top,
            splits=autotune.searched_splits(args.zero1, args.fsdp), compile_on=chip,
        )
    if args.time is not None:
        return trial(result, args.time)
    if topo is None:
        return result
    return verify(result, topo, args.verify or DEFAULT_COUNT)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        auto_only = {"--devices": args.devices, "--devices_per_node": args.devices_per_node,
                     "--memory_gib": args.memory_gib}
        given = [flag for flag, value in auto_only.items() if value is not None]
        if given and not args.auto:
            raise ConfigError(f"{', '.join(given)} plan(s) a cluster for the autotuner; add --auto")
        if args.aot and args.topology is None:
            raise ConfigError("--aot needs --topology, e.g. --topology v5p:4x4x4 or cpu:8")
        if args.topology is not None and not (args.aot or args.auto):
            raise ConfigError("--topology is for compiling the training step; add --aot")
        if args.verify is not None and not (args.auto and args.topology):
            raise ConfigError("--verify compiles the autotuner's candidates for a topology; "
                              "add --auto and --topology (e.g. v5p:4x4x4 or cpu:8)")
        if args.time is not None and not args.auto:
            raise ConfigError("--time runs the autotuner's candidates; add --auto")
        if args.time is not None and args.topology is not None:
            raise ConfigError("--time runs the candidates on the devices present, --topology "
                              "compiles them for other devices; use one of them")
        if args.topology is not None:
            topology.prepare_host(args.topology)  # before JAX starts
        if args.time is not None and (args.device or "cpu") == "cpu" and args.devices:
            topology.prepare_host(f"cpu:{args.devices}")  # before JAX starts: devices to time
        result = run(args)
        print(result.to_json() if args.json else result.table())

    return cli.guard(body)


if __name__ == "__main__":
    sys.exit(main())
