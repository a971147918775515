"""Zero-bubble schedules against 1F1B: the split backward's FLOPs, simulated and measured steps.

Run (CPU, forces 4 devices; about 3-5 minutes on two cores):
  PYTHONPATH=. python experiments/bench_zero_bubble.py --preset small --stages 4 \
      --microbatches 8 --batch 32 --seq_len 64 --reps 5

Prints one JSON object:
  zb_flops_split: FLOPs(B) + FLOPs(W) / FLOPs(fused backward) of one stage's compiled programs
    (XLA's `cost_analysis()`). Expect <= 1.05.
  zb_h1_sim_ratio, zbv_sim_ratio: simulated step time of zb_h1 / zbv over 1f1b's, each fed the
    per-stage F, B, W (and fused backward) times measured on one stage's compiled programs
    (zbv's half stages measured at half the layers). Lockstep simulation, as the SPMD executor
    runs (every tick lasts as long as its slowest op); the event-driven figures are under
    "sim". Expect <= 0.85 and <= 0.80.
  zb_temp_ratio: the larger of zb_h1's and zbv's per-device temp bytes
    (`memory_analysis()`) over 1f1b's, for the whole compiled step. Expect <= 1.15.
  zb_step_ratio: median zb_h1 step time over median 1f1b step time, run alternately on forced
    CPU devices (they share the host's cores, so bubbles cost little here). Expect <= 1.05.

Measured on the idle 2-core host (stash written inside the executor's conditionals, carries
paired with residuals, `jaxpipe.stash`): zb_flops_split 1.00, zb_h1_sim_ratio 0.84,
zbv_sim_ratio 0.87, zb_temp_ratio 1.00 (1f1b 28.0 MB, zb_h1 28.0 MB, zbv 26.1 MB),
zb_step_ratio 1.17 (zbv 1.22; steps 0.38 s, 0.45 s, 0.47 s); one stage's F 3.5 ms, fused
backward 6.5 ms, B 4.2 ms, W 2.8 ms. The op times the sim ratios are fed move with the host's
load (a run with a test process beside it gave 0.78 / 0.58).

Before, with lean blocks but carries in buffers of their own and every buffer written outside
the conditionals: zb_h1_sim_ratio 0.88, zbv_sim_ratio 0.92, zb_temp_ratio 1.34 (zbv 1.24; 1f1b
27.9 MB, zb_h1 37.3 MB, zbv 34.4 MB), zb_step_ratio 1.23 (zbv 1.36). Before lean blocks: 1f1b
57.6 MB, zb_h1 74.7 MB, zbv 66.5 MB, zb_step_ratio 1.26 / 1.25.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import bench_json  # noqa: E402

from jaxpipe import cli  # noqa: E402 (after JAX_PLATFORMS is set)

SCHEDULES = (("1f1b", 1), ("zb_h1", 1), ("zbv", 2))


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="bench_zero_bubble.py", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    return p


def _median_seconds(runs: dict, reps: int) -> dict:
    """Median seconds of each `name: (compiled, args)`, the programs run alternately (so a
    change in the host's load hits them alike)."""
    import jax
    import numpy as np

    times = {name: [] for name in runs}
    for fn, args in runs.values():
        jax.block_until_ready(fn(*args))
    for _ in range(reps):
        for name, (fn, args) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def stage_ops(cfg, layers: int, x_BTD, reps: int) -> dict:
    """Compiled F, B, W and fused backward of one stage of `layers` layers: seconds, FLOPs."""
    import jax
    import jax.numpy as jnp

    from jaxpipe import model as M
    from jaxpipe.onef1b import _StageVjp

    w_J = jax.tree.map(lambda a: a[:layers], M.init_params(cfg, 0)["blocks"])
    stage = _StageVjp(cfg, layers, layers, split=True)
    compiled = lambda f, *a: jax.jit(f).lower(*a).compile()
    fwd = compiled(lambda w, h: stage.forward(w, layers, h), w_J, x_BTD)
    y, kept = fwd(w_J, x_BTD)
    dy = jnp.cos(y)
    fused = compiled(lambda w, k, d: stage.backward(w, layers, k, d), w_J, kept, dy)
    b = compiled(lambda w, k, d: stage.input_grad(w, layers, k, d), w_J, kept, dy)
    carry = b(w_J, kept, dy)[1]
    kept_w = [kept[i] for i in stage.split.w_stashed]
    w = compiled(lambda w, k, c: stage.weight_grad(w, layers, k, c), w_J, kept_w, carry)
    runs = {
        "F": (fwd, (w_J, x_BTD)),
        "fused": (fused, (w_J, kept, dy)),
        "B": (b, (w_J, kept, dy)),
        "W": (w, (w_J, kept_w, carry)),
    }
    seconds = _median_seconds(runs, 5 * reps)
    return {
        name: {"seconds": seconds[name], "flops": float(prog.cost_analysis()["flops"])}
        for name, (prog, _) in runs.items()
    }


def measure(args) -> dict:
    """The JSON figures for parsed `args` (JAX must already have >= args.stages devices)."""
    import jax
    import numpy as np

    from jaxpipe import model as M
    from jaxpipe.config import PipelineConfig, get_preset
    from jaxpipe.mesh import make_mesh
    from jaxpipe.pipeline import Pipeline
    from jaxpipe.schedule import full_table
    from jaxpipe.simulate import simulate

    S, Mb = args.stages, args.microbatches
    print(f"process {jax.process_index()} devices {jax.devices()[:S]}", file=sys.stderr)
    cfg = get_preset(args.preset, num_layers=2 * S)
    x_BTD = jax.random.normal(jax.random.key(2), (args.batch // Mb, args.seq_len, cfg.d_model))
    full, half = stage_ops(cfg, 2, x_BTD, args.reps), stage_ops(cfg, 1, x_BTD, args.reps)
    t = {k: v["seconds"] for k, v in full.items()}
    # Per virtual stage (a scalar would be read as a whole stage's time, split over repeats).
    th = {k: np.full(2 * S, v["seconds"]) for k, v in half.items()}
    sims = {}
    for lockstep in (True, False):
        key = "lockstep" if lockstep else "event"
        sims[key] = {
            "1f1b": simulate(full_table("1f1b", S, Mb), t["F"], t["fused"], 0, lockstep).step_time,
            "zb_h1": simulate(
                full_table("zb_h1", S, Mb), t["F"], t["B"], 0, lockstep, wgt_time=t["W"]
            ).step_time,
            "zbv": simulate(
                full_table("zbv", S, Mb, 2), th["F"], th["B"], 0, lockstep, wgt_time=th["W"]
            ).step_time,
        }
    params = M.init_params(cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len + 1), 0, 256)
    steps, temps = {}, {}
    for schedule, R in SCHEDULES:
        pcfg = PipelineConfig(num_stages=S, num_microbatches=Mb, num_repeats=R, schedule=schedule)
        pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[:S]))
        placed = pipe.place(params)
        compiled = pipe.jit(pipe.value_and_grad).lower(placed, tokens).compile()
        temps[schedule] = int(compiled.memory_analysis().temp_size_in_bytes)
        steps[schedule] = (compiled, placed)
    median = _median_seconds(
        {name: (compiled, (placed, tokens)) for name, (compiled, placed) in steps.items()},
        args.reps,
    )
    lock = sims["lockstep"]
    return {
        "config": vars(args),
        "zb_flops_split": (full["B"]["flops"] + full["W"]["flops"]) / full["fused"]["flops"],
        "zb_h1_sim_ratio": lock["zb_h1"] / lock["1f1b"],
        "zbv_sim_ratio": lock["zbv"] / lock["1f1b"],
        "zb_temp_ratio": max(temps["zb_h1"], temps["zbv"]) / temps["1f1b"],
        "zb_step_ratio": median["zb_h1"] / median["1f1b"],
        "stage_ops": {"full": full, "half": half},
        "sim": sims,
        "event_sim_ratios": {
            k: sims["event"][k] / sims["event"]["1f1b"] for k in ("zb_h1", "zbv")
        },
        "temp_bytes": temps,
        "temp_ratios": {k: temps[k] / temps["1f1b"] for k in ("zb_h1", "zbv")},
        "step_seconds_median": median,
        "zbv_step_ratio": median["zbv"] / median["1f1b"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return bench_json.main_on_cpu_devices(measure, args, args.stages)


if __name__ == "__main__":
    sys.exit(main())
