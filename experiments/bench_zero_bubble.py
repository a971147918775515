"""Zero-bubble schedules against 1F1B: the split backward's FLOPs, simulated and measured steps.

Run (CPU, forces 4 devices; about 2 minutes on two cores):
  PYTHONPATH=. python experiments/bench_zero_bubble.py --preset small --stages 4 \
      --microbatches 8 --batch 32 --seq_len 64 --reps 5

Prints one JSON object:
  zb_flops_split: FLOPs(B) + FLOPs(W) / FLOPs(fused backward) of one stage's compiled programs
    (XLA's `cost_analysis()`). Expect <= 1.05.
  zb_h1_sim_ratio, zbv_sim_ratio: simulated step time of zb_h1 / zbv over 1f1b's, each fed the
    per-stage F, B, W (and fused backward) times measured on one stage's compiled programs
    (zbv's half stages measured at half the layers). Each op is timed ten times inside one
    program (`_looped`: no per-call dispatch, which the executor's ops inside its tick loop do
    not pay either), in a fresh process pinned to one core, as a device runs its ops one after
    another. Lockstep simulation, as the SPMD executor runs (every tick lasts as long as its
    slowest op). Expect <= 0.85 and <= 0.80. Under "sim_ratios": the same with the
    event-driven simulation, and with the ops timed on the host's shared cores ("shared"),
    where XLA's CPU runtime overlaps the fused backward's weight-gradient matmuls with its
    input-gradient chain.
  zb_temp_ratio: the larger of zb_h1's and zbv's per-device temp bytes
    (`memory_analysis()`) over 1f1b's, for the whole compiled step. Expect <= 1.15.
  zb_step_ratio: zb_h1 step time over 1f1b's on forced CPU devices (they share the host's
    cores, so bubbles cost little here). Each of --step_processes fresh processes compiles the
    steps and times --reps rounds, each running every schedule's step once; its ratio is the
    median of the ratios within a round (drift between rounds cancels), and zb_step_ratio the
    median over processes (per process under step_ratios_per_process). Expect <= 1.05.
    step_seconds_median: each schedule's median step.

Measured on the idle 2-core host, two runs: zb_flops_split 1.00, zb_h1_sim_ratio 0.71 / 0.69,
zbv_sim_ratio 0.65 / 0.69 (one core: F 4.2 ms, fused backward 11.4 ms, B 6.2 / 5.8 ms, W 5.8 /
5.9 ms; shared cores: 0.90 / 0.82 and 0.76 / 0.83, with B + W 1.15 / 1.06 x the fused
backward), zb_temp_ratio 1.00 (1f1b 28.0 MB, zb_h1 28.0 MB, zbv 26.1 MB), zb_step_ratio 1.21 /
1.23 (zbv 1.30 / 1.22; steps 0.43 / 0.42 s for 1f1b). Timed one call each (before `_looped`
and the pinned process) the sim ratios were 0.84 and 0.87: a call's dispatch (about 1.5 ms on
CPU) was charged to every split op. A third run, after the executor ordered each tick's W
before its sends: sim ratios 0.66 / 0.59, zb_step_ratio 1.21 (zbv 1.14). The step ratio:
these 4 devices share 2 cores, the step takes about twice its ops' simulated time on them, and
zb_h1's 27 ticks (1f1b: 22) each pay that overhead. Four runs after each tick's sends came to
read W's conditional (the barrier had not ordered them) and the first stage came to make the
embedding lookups' gradient itself (no all-reduce of d(input) over `pipe`): zb_step_ratio 1.07,
1.08, 1.07, 1.13, 1.08 (zbv 1.03, 1.07, 1.05, 1.14, 1.11), sim ratios 0.67-0.69 and
0.62-0.66. What stays: on one core, the two stages of `small` (S = 2, M = 4) run zb_h1's step
in 1.11 x 1f1b's time with the same op time standalone; an idle tick costs 0.17 ms, so the 3
more ticks matter little, and the carries do: B writes them to the stash and W reads them back
(activation-sized per weight matmul: 4.7 MB per micro-batch and stage here). With B/W pairs
fused where nothing crosses stages between them (`schedule.fused_backward`; one pair of 32 at
S = 4, M = 8), one run: zb_step_ratio 1.09 (zbv 1.08), zb_temp_ratio 1.01, sim ratios 0.70
and 0.60. A trace of this step (`profile_step.py --step zb_h1 --seq_len 64 --microbatches 8`
against `--step 1f1b`) puts 0.78 CPU-s per step against 0.67-0.70, the difference in W's
transposing copies of its operands ([512, 256], 17 ms against 4 ms per step), carry writes
(dynamic-update-slice 42 ms against 19 ms) and a copy of the gradient inbox per tick.
Some of those copies were B copying paired stash buffers whole: a carry took the slot of
another layer's residual, so each B's write into one buffer read another that its next write
overwrote. Pairing each carry with the residual it is computed from (`BackwardSplit.carry_near`),
three runs alternating with three of the build before: zb_step_ratio 1.06, 1.02, 1.00 against
1.06, 1.06, 1.06 (zb_h1 steps 0.256, 0.238, 0.238 s against 0.269, 0.257, 0.247 s; zbv 1.07,
1.03, 1.06 against 1.03, 1.06, 1.09), zb_temp_ratio 1.01. On one core a stage's B + W still
take 1.09 x its fused backward (F 2.6 ms, fused 5.2 ms, B 3.5 ms, W 2.1 ms, `stage_ops` pinned):
W reads its carries back from memory where the fused backward consumes them as they are made.
In one program (`stage_ops`' "BW"), B then W take about the fused backward's time: one run,
1.02 x on one core (6.33 against 6.22 ms; B and W as programs of their own 6.35 ms), 1.03 x on
the shared cores (5.06 against 4.91 ms; apart 5.76 ms). The split's work is the fused
backward's, and what the step adds is the executor's carry writes and reads and its extra ticks.

With a joined pair run as B, a barrier and W, and the step ratio taken per round (the median
over 11 rounds of the ratio within each), five runs: zb_step_ratio 0.99, 1.02, 1.00, 1.04,
1.07 (zbv 1.01, 1.09, 1.05, 1.08, 1.11), zb_temp_ratio 1.01, sim ratios 0.67-0.69 and
0.61-0.65; five runs before with 5 rounds and medians' ratio: 1.05, 1.04, 1.04, 1.06, 1.01.
Those runs differ by more than their rounds do: a process's compiled programs and thread
placement shift its ratio. With the median over three fresh processes (the command above),
five runs: zb_step_ratio 1.03, 1.03, 1.03, 1.03, 1.03 (1.032, 1.029, 1.032, 1.025, 1.026;
per process 0.99-1.06, 13 of 15 at most 1.05), zbv_step_ratio 1.04-1.07, zb_temp_ratio 1.01,
zb_h1_sim_ratio 0.68-0.70, zbv_sim_ratio 0.62-0.66, zb_flops_split 1.00. Since pairs join only
where they are a stage's worth (`schedule.fused_backward`; here the one pair that had joined no
longer does), three runs: zb_step_ratio 1.046, 1.035, 1.027 (per process 0.97-1.06), zbv
1.06-1.09, zb_temp_ratio 1.00, sim ratios 0.68-0.69 and 0.65-0.69.

Before, with lean blocks but carries in buffers of their own and every buffer written outside
the conditionals: zb_temp_ratio 1.34 (zbv 1.24; 1f1b 27.9 MB, zb_h1 37.3 MB, zbv 34.4 MB),
zb_step_ratio 1.23 (zbv 1.36). Before lean blocks: 1f1b 57.6 MB, zb_h1 74.7 MB, zbv 66.5 MB,
zb_step_ratio 1.26 / 1.25.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import bench_json  # noqa: E402

from jaxpipe import cli  # noqa: E402 (after JAX_PLATFORMS is set)
from jaxpipe.config import ConfigError  # noqa: E402

SCHEDULES = (("1f1b", 1), ("zb_h1", 1), ("zbv", 2))


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="bench_zero_bubble.py", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--step_processes", type=int, default=3,
                   help="fresh processes that each compile and time the steps")
    return p


def _timed_rounds(runs: dict, reps: int) -> dict:
    """Seconds of each `name: (compiled, args)` in each of `reps` rounds, the programs run one
    after another in every round (so a change in the host's load hits them alike)."""
    import jax

    times = {name: [] for name in runs}
    for fn, args in runs.values():
        jax.block_until_ready(fn(*args))
    for _ in range(reps):
        for name, (fn, args) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return times


def _median_seconds(runs: dict, reps: int) -> dict:
    """Median seconds of each `name: (compiled, args)` over `_timed_rounds`."""
    import numpy as np

    return {name: float(np.median(t)) for name, t in _timed_rounds(runs, reps).items()}


def median_ratio(times: dict, name: str, base: str) -> float:
    """Median over rounds of `name`'s time over `base`'s in the same round (`_timed_rounds`):
    the host's drift between rounds cancels."""
    import numpy as np

    return float(np.median(np.asarray(times[name]) / np.asarray(times[base])))


def _looped(fn, n: int):
    """`fn` run n times inside one program, each run on the barrier-passed inputs of the last
    (so the compiler can neither hoist it out of the loop nor drop it): timing it over n gives
    the op's own time, without the per-call dispatch that a stage's ops inside the executor's
    tick loop do not pay."""
    import jax
    import jax.numpy as jnp

    def body(_, carry):
        args = jax.lax.optimization_barrier(carry[0])
        return args, fn(*args)

    def run(*args):
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(fn, *args))
        return jax.lax.fori_loop(0, n, body, (args, zeros))[1]

    return run


def _b_then_w(stage, w, count, kept, dy):
    dh, carry = stage.input_grad(w, count, kept, dy)
    return stage.weight_grad(w, count, [kept[i] for i in stage.split.w_stashed], carry), dh


def stage_ops(cfg, layers: int, x_BTD, reps: int, loop: int = 10) -> dict:
    """Compiled F, B, W and fused backward of one stage of `layers` layers, and B then W in one
    program ("BW", W on B's carry as the executor runs a joined pair): seconds per op (each
    timed as `loop` runs inside one program), FLOPs of one run."""
    import jax
    import jax.numpy as jnp

    from jaxpipe import model as M
    from jaxpipe.onef1b import _StageVjp

    w_J = jax.tree.map(lambda a: a[:layers], M.init_params(cfg, 0)["blocks"])
    stage = _StageVjp(cfg, layers, layers, split=True)
    ops = {
        "F": lambda w, h: stage.forward(w, layers, h),
        "fused": lambda w, k, d: stage.backward(w, layers, k, d),
        "B": lambda w, k, d: stage.input_grad(w, layers, k, d),
        "W": lambda w, k, c: stage.weight_grad(w, layers, k, c),
        "BW": lambda w, k, d: _b_then_w(stage, w, layers, k, d),
    }
    y, kept = jax.jit(ops["F"])(w_J, x_BTD)
    dy = jnp.cos(y)
    carry = jax.jit(ops["B"])(w_J, kept, dy)[1]
    kept_w = [kept[i] for i in stage.split.w_stashed]
    args = {"F": (w_J, x_BTD), "fused": (w_J, kept, dy), "B": (w_J, kept, dy)}
    args["BW"] = args["B"]
    args["W"] = (w_J, kept_w, carry)
    flops = {
        name: float(jax.jit(fn).lower(*args[name]).compile().cost_analysis()["flops"])
        for name, fn in ops.items()
    }
    runs = {
        name: (jax.jit(_looped(fn, loop)).lower(*args[name]).compile(), args[name])
        for name, fn in ops.items()
    }
    seconds = _median_seconds(runs, reps)
    return {
        name: {"seconds": seconds[name] / loop, "flops": flops[name]} for name in ops
    }


def op_times(args) -> tuple[dict, dict]:
    """F, B, W and fused backward of a whole stage (2 layers) and of a half stage (1 layer, a
    zbv virtual stage), on this process's CPU device."""
    import jax

    from jaxpipe.config import get_preset

    cfg = get_preset(args.preset, num_layers=2 * args.stages)
    shape = (args.batch // args.microbatches, args.seq_len, cfg.d_model)
    x_BTD = jax.random.normal(jax.random.key(2), shape)
    return stage_ops(cfg, 2, x_BTD, args.reps), stage_ops(cfg, 1, x_BTD, args.reps)


def _op_times_on_one_core(args, queue) -> None:
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # before JAX starts its threads
    queue.put(op_times(args))


def _pinned_op_times(args) -> tuple[dict, dict]:
    """`op_times` in a fresh process pinned to one core: a device runs a stage's ops one after
    another, as an accelerator does, while on the shared cores XLA's CPU runtime overlaps a
    fused backward's independent weight-gradient matmuls with its input-gradient chain."""
    return _in_fresh_process(_op_times_on_one_core, args)


def _in_fresh_process(target, args):
    """What `target(args, queue)` puts on the queue, run in a fresh (spawned) process."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=target, args=(args, queue))
    child.start()
    try:
        return queue.get(timeout=900)
    finally:
        child.join()


def _simulated(S: int, Mb: int, full: dict, half: dict) -> dict:
    """Lockstep and event-driven step times of 1f1b, zb_h1 and zbv fed these op times."""
    import numpy as np

    from jaxpipe.schedule import full_table
    from jaxpipe.simulate import simulate

    t = {k: v["seconds"] for k, v in full.items()}
    # Per virtual stage (a scalar would be read as a whole stage's time, split over repeats).
    th = {k: np.full(2 * S, v["seconds"]) for k, v in half.items()}
    sims = {}
    for lockstep in (True, False):
        sims["lockstep" if lockstep else "event"] = {
            "1f1b": simulate(full_table("1f1b", S, Mb), t["F"], t["fused"], 0, lockstep).step_time,
            "zb_h1": simulate(
                full_table("zb_h1", S, Mb), t["F"], t["B"], 0, lockstep, wgt_time=t["W"]
            ).step_time,
            "zbv": simulate(
                full_table("zbv", S, Mb, 2), th["F"], th["B"], 0, lockstep, wgt_time=th["W"]
            ).step_time,
        }
    return sims


def _steps(args) -> tuple[dict, dict]:
    """Each schedule's step seconds per round (`_timed_rounds`) and temp bytes, compiled and run
    on this process's first `args.stages` devices."""
    import jax

    from jaxpipe import model as M
    from jaxpipe.config import PipelineConfig, get_preset
    from jaxpipe.mesh import make_mesh
    from jaxpipe.pipeline import Pipeline

    S, Mb = args.stages, args.microbatches
    cfg = get_preset(args.preset, num_layers=2 * S)
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
    times = _timed_rounds(
        {name: (compiled, (placed, tokens)) for name, (compiled, placed) in steps.items()},
        args.reps,
    )
    return times, temps


def _steps_in_this_process(args, queue) -> None:
    from jaxpipe.mesh import force_cpu_devices

    force_cpu_devices(args.stages)
    queue.put(_steps(args))


def _steps_in_fresh_processes(args) -> list[tuple[dict, dict]]:
    """`_steps` in --step_processes fresh processes, one after another: a process's compiled
    programs and thread placement shift its ratios by a few per cent, which the median over
    processes evens out."""
    return [_in_fresh_process(_steps_in_this_process, args) for _ in range(args.step_processes)]


def measure(args) -> dict:
    """The JSON figures for parsed `args` (JAX must already have >= args.stages devices)."""
    import jax
    import numpy as np

    S, Mb = args.stages, args.microbatches
    if args.reps < 1 or args.step_processes < 1:
        raise ConfigError("--reps and --step_processes must be >= 1")
    print(f"process {jax.process_index()} devices {jax.devices()[:S]}", file=sys.stderr)
    ops = {"one_core": _pinned_op_times(args), "shared": op_times(args)}
    sims = {where: _simulated(S, Mb, *ops[where]) for where in ops}
    full = ops["one_core"][0]
    runs = _steps_in_fresh_processes(args)
    temps = runs[0][1]
    step_ratios = {k: [median_ratio(times, k, "1f1b") for times, _ in runs]
                   for k in ("zb_h1", "zbv")}
    median = {name: float(np.median([np.median(times[name]) for times, _ in runs]))
              for name in runs[0][0]}
    lock = sims["one_core"]["lockstep"]
    ratios = lambda sim: {k: sim[k] / sim["1f1b"] for k in ("zb_h1", "zbv")}
    return {
        "config": vars(args),
        "zb_flops_split": (full["B"]["flops"] + full["W"]["flops"]) / full["fused"]["flops"],
        "zb_h1_sim_ratio": lock["zb_h1"] / lock["1f1b"],
        "zbv_sim_ratio": lock["zbv"] / lock["1f1b"],
        "zb_temp_ratio": max(temps["zb_h1"], temps["zbv"]) / temps["1f1b"],
        "zb_step_ratio": float(np.median(step_ratios["zb_h1"])),
        "stage_ops": {where: {"full": f, "half": h} for where, (f, h) in ops.items()},
        "sim": sims,
        "sim_ratios": {
            where: {key: ratios(sim) for key, sim in by.items()} for where, by in sims.items()
        },
        "temp_bytes": temps,
        "temp_ratios": {k: temps[k] / temps["1f1b"] for k in ("zb_h1", "zbv")},
        "step_seconds_median": median,
        "zbv_step_ratio": float(np.median(step_ratios["zbv"])),
        "step_ratios_per_process": step_ratios,
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return bench_json.main_on_cpu_devices(measure, args, args.stages)


if __name__ == "__main__":
    sys.exit(main())
