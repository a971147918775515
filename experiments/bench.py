"""Pipeline executor benchmark: ratios measured side by side in one run, printed as JSON.

    python experiments/bench.py --json bench.json

Keys (targets in brackets):
  p1_overhead      pipelined step, 1 stage, 1 micro-batch / reference step, same device  [<= 1.05]
  p4_m16_ratio     pipelined step on 4 CPU devices (S=4, M=16) / reference on 1 device   [<= 1.15]
  compile_ratio    compile time at (32 layers, M=32) / at (4 layers, M=4), S=4           [<= 1.5]
  temp_bytes_per_device  memory_analysis() temp bytes of each configuration above
A "step" is forward + backward (value_and_grad) of the `small` model. Timings alternate
between the configurations compared and report medians.

With --schedules (default) the keys of `bench_schedules.py` join in (onef1b_temp_ratio
[<= 0.35], onef1b_step_ratio [<= 1.10], bubble_table_vs_formula [all match]); with --partition
(default) those of `bench_partition.py` (cost_vs_uniform [<= 0.85], predict_error [<= 0.25],
plan_seconds [<= 60]); with --zero_bubble (default) those of `bench_zero_bubble.py` at S=4,
M=8 (zb_flops_split [<= 1.05], zb_h1_sim_ratio [<= 0.85], zbv_sim_ratio [<= 0.80],
zb_temp_ratio [<= 1.15], zb_step_ratio [<= 1.05]), each with its details under "schedules" /
"partition" / "zero_bubble". About 8 minutes on 2 cores.
"""

from __future__ import annotations

import os
import statistics
import time

import bench_json
from absl import flags

flags.DEFINE_string("json", None, "Write the results here as well as to stdout.")
flags.DEFINE_integer("rounds", 7, "Alternating timing rounds.")
flags.DEFINE_integer("batch_size", 32, "Global batch (sequences).")
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
flags.DEFINE_bool(
    "xla_options",
    True,
    "Compile every configuration (the reference too) with jaxpipe's XLA options "
    "(`pipeline.compiler_options`); --noxla_options uses XLA's defaults.",
)
flags.DEFINE_bool("schedules", True, "Add bench_schedules.py's 1F1B vs GPipe figures.")
flags.DEFINE_bool("partition", True, "Add bench_partition.py's partitioner figures.")
flags.DEFINE_bool("zero_bubble", True, "Add bench_zero_bubble.py's zb_h1 / zbv vs 1F1B figures.")
_F = flags.FLAGS


def _compile(fn, *args, devices):
    t = time.perf_counter()
    options = compiler_options(devices) if _F.xla_options else None
    compiled = jax.jit(fn, compiler_options=options).lower(*args).compile()
    return compiled, time.perf_counter() - t


def _temp_bytes(compiled) -> int:
    return int(compiled.memory_analysis().temp_size_in_bytes)


def _time_once(compiled, *args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t


def _alternate(runs: dict, rounds: int) -> dict:
    """runs: name -> (compiled, args). Returns name -> median seconds."""
    for compiled, args in runs.values():
        _time_once(compiled, *args)  # warm-up
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (compiled, args) in runs.items():
            times[name].append(_time_once(compiled, *args))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _pipelined(cfg, S, Mb, devices, batch_size):
    pcfg = PipelineConfig(num_stages=S, num_microbatches=Mb)
    pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, devices))
    params = pipe.place(M.init_params(cfg, 0))
    tokens = jax.device_put(_tokens(cfg, batch_size), pipe.batch_sharding())
    compiled, seconds = _compile(pipe.value_and_grad, params, tokens, devices=devices)
    return compiled, (params, tokens), seconds


def _tokens(cfg, batch_size):
    return jax.random.randint(jax.random.key(0), (batch_size, _F.seq_len + 1), 0, cfg.vocab_size)


def main(argv):
    del argv
    cfg = get_preset("small", max_seq_len=_F.seq_len)
    dev0 = jax.devices()[0]
    params = jax.device_put(M.init_params(cfg, 0), dev0)
    tokens = jax.device_put(_tokens(cfg, _F.batch_size), dev0)
    ref, _ = _compile(
        jax.value_and_grad(lambda p, t: M.reference_loss(cfg, p, t)), params, tokens, devices=[dev0]
    )

    p1, p1_args, _ = _pipelined(cfg, 1, 1, [dev0], _F.batch_size)
    p4, p4_args, _ = _pipelined(cfg, 4, 16, jax.devices()[:4], _F.batch_size)
    medians = _alternate(
        {"reference": (ref, (params, tokens)), "p1": (p1, p1_args), "p4_m16": (p4, p4_args)},
        _F.rounds,
    )

    small = get_preset("small", num_layers=4, max_seq_len=_F.seq_len)
    large = get_preset("small", num_layers=32, max_seq_len=_F.seq_len)
    c_small = [_pipelined(small, 4, 4, jax.devices()[:4], 32)[2] for _ in range(3)]
    c_large = [_pipelined(large, 4, 32, jax.devices()[:4], 64)[2] for _ in range(3)]

    result = {
        "p1_overhead": medians["p1"] / medians["reference"],
        "p4_m16_ratio": medians["p4_m16"] / medians["reference"],
        "compile_ratio": min(c_large) / min(c_small),
        "step_seconds": medians,
        "compile_seconds": {"layers4_m4": min(c_small), "layers32_m32": min(c_large)},
        "temp_bytes_per_device": {
            "reference": _temp_bytes(ref),
            "p1_m1": _temp_bytes(p1),
            "p4_m16": _temp_bytes(p4),
        },
        "config": {
            "model": "small",
            "batch_size": _F.batch_size,
            "seq_len": _F.seq_len,
            "rounds": _F.rounds,
            "cpu_cores": os.cpu_count(),
            "xla_options": _F.xla_options,
        },
    }
    if _F.schedules:
        import bench_schedules

        args = bench_schedules.parser().parse_args([])
        args.xla_defaults = not _F.xla_options
        sched = bench_schedules.measure(args)
        for key in ("onef1b_temp_ratio", "onef1b_step_ratio"):
            result[key] = sched[key]
        result["bubble_table_vs_formula"] = sched["bubble_table_vs_formula"]["all_match"]
        result["schedules"] = sched
    if _F.partition:
        import bench_partition

        part = {name: fn() for name, fn in bench_partition.BENCHES.items()}
        result["cost_vs_uniform"] = part["cost_vs_uniform"]["ratio"]
        result["predict_error"] = part["predict_error"]["cost"]["max_rel_error"]
        result["plan_seconds"] = part["plan_seconds"]["seconds"]
        result["partition"] = part
    if _F.zero_bubble:
        import bench_zero_bubble

        zb = bench_zero_bubble.measure(bench_zero_bubble.parser().parse_args([]))
        for key in (
            "zb_flops_split",
            "zb_h1_sim_ratio",
            "zbv_sim_ratio",
            "zb_temp_ratio",
            "zb_step_ratio",
        ):
            result[key] = zb[key]
        result["zero_bubble"] = zb
    bench_json.emit(result, _F.json)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    from jaxpipe import model as M
    from jaxpipe.cli import run_app
    from jaxpipe.config import PipelineConfig, get_preset
    from jaxpipe.mesh import make_mesh
    from jaxpipe.pipeline import Pipeline, compiler_options

    run_app(main)
