"""Pipelined steps with one process per stage, each pinned to its own core: bubbles that cost.

    PYTHONPATH=. python experiments/bench_pinned.py

(S = 2 stages, M = 4 micro-batches, the `small` model with 2 layers per stage, batch 16 x 128;
about 2 minutes on 2 cores; needs S cores.) On forced CPU devices in one process every stage
shares the host's cores, so a stage that waits frees its core for the others and a bubble costs
little; here each stage is its own process (`launch_local.launch`, one CPU device each, gloo
collectives between them) pinned to core i (`os.sched_setaffinity`, before JAX starts its
threads), so a stage that waits leaves its core idle, as an accelerator would.

Every process compiles the same step of each schedule (`Pipeline.jit(pipe.value_and_grad)`,
forward + backward, no optimizer) and times the schedules alternately, --reps rounds; process 0
reports medians. Each process also times one stage's compiled programs on its own core (F, the
fused backward, and the split backward's B and W; `bench_zero_bubble.stage_ops`), and:
  work       M x (F + backward) of one stage: F + fused for gpipe and 1f1b, F + B + W for zb_h1;
  bubble     1 - work / step time, measured (what the step spends beyond one stage's compute:
             idle ticks, sends, the embedding and head, dispatch);
  link_s     one `ppermute` of a micro-batch's activation to the other process, timed in a loop
             of them;
  table_bubble  1 - work / the lockstep simulation of the executor's table
             (`schedule.executor_table`, `simulate.simulate`) fed those op times and link_s:
             the bubble the table and the sends alone predict.

Keys: pinned_zb_ratio = zb_h1 step / 1f1b step (expect <= 0.95), pinned_gpipe_ratio = gpipe /
1f1b; per schedule: step_s, bubble, table_bubble, bubble_gap (measured - table); stage_ops;
link_s; config.

Measured on the idle 2-core host, three runs of the command above: pinned_zb_ratio 1.21, 1.19,
1.22; pinned_gpipe_ratio 0.98, 1.04, 1.00. Run-to-run drift of the absolute step times
(1f1b 0.24-0.27 s) is as large as any effect of a code change, so only each run's ratios
compare; an earlier build gave zb_h1 / 1f1b 1.05-1.18. Measured bubble against the table's then:
1f1b 0.41 vs 0.44, zb_h1 0.50 vs 0.28, gpipe 0.41 vs 0.30. 1f1b runs at its (lockstep) table's
bubble; zb_h1's 13 ticks to 1f1b's 10 at S = 2, M = 4 spend their extra time waiting at the
sends (a `jax.profiler` trace of each process puts the two schedules' op time per stage within
7 %), though both send 8 times a step. link_s varies between runs (0.4-3.8 ms).

A later run, with `stage_ops` timing each op inside one program (no dispatch): pinned_zb_ratio
1.18, pinned_gpipe_ratio 1.00 (1f1b 0.34 s: the host ran slower that day); one stage's F 10.9
ms, fused backward 31.5 ms, B 17.2 ms, W 14.9 ms (B + W = 1.02 x fused); bubbles 1f1b 0.50 vs
0.46, zb_h1 0.57 vs 0.32, gpipe 0.50 vs 0.32; link_s 3.8 ms. A trace of both processes then
showed where zb_h1 waited: XLA ran a tick's W after the tick's sends (nothing ordered them), so
a stage's W landed beside its next op while the other stage waited at the next send (31 ms at
one send). With the executor's W ordered before the sends (an optimization barrier), three
runs: pinned_zb_ratio 1.02, 1.09, 1.02; pinned_gpipe_ratio 1.01, 1.00, 1.01; zb_h1's measured
bubble 0.53-0.58 against its table's 0.16-0.34 (1f1b: 0.51-0.58 against 0.39-0.47).

The barrier did not hold: XLA's CPU compiler drops optimization barriers and its runtime runs
whatever is ready, so a trace still showed a stage sending first and running its W beside the
next tick's op. Since each tick's sends read the output of W's conditional, and the first stage
makes the embedding lookups' gradient itself (the all-reduce of the batch's d(input) over `pipe`
took 14 ms of the 150 ms step, now one of the table's gradient, 1 ms): pinned_zb_ratio 0.96 and
0.98 in two runs with the first change, 1.00, 0.98, 0.97, 1.00 and 1.03 in five with both;
pinned_gpipe_ratio 1.03, 1.09 and 1.02, 1.03, 1.03, 0.99, 1.08; measured bubbles in the last
five: 1f1b 0.42-0.48 against its table's 0.41-0.46, zb_h1 0.43-0.49 against 0.25-0.35, gpipe
0.44-0.48 against 0.23-0.31. The trace now shows each stage's ops in the
table's ticks; what stays between zb_h1 and its table is the split's own cost inside the
program: per stage and step, 123-127 ms of XLA ops against 1f1b's 108-110 ms (traced), where
standalone B + W take the fused backward's time. The difference is in the carries B writes to
the stash and W reads back (2.8 ms more dynamic-update-slice, 3.3 ms more transposing copies),
and in 3 more ticks of inbox and send bookkeeping.

Since a B whose W is its stage's next op, with nothing crossing between stages meanwhile, runs
as one fused backward (`schedule.fused_backward`: every pair of the first stage here), five
runs: pinned_zb_ratio 0.92, 0.97, 0.88, 0.92, 0.96 (two runs of the previous build the same
hour: 0.97, 0.97); pinned_gpipe_ratio 1.06, 1.00, 0.97, 1.06, 1.03; measured bubbles 1f1b
0.43-0.50 against its table's 0.40-0.42, zb_h1 0.41-0.43 against 0.24-0.28 (the table still
charges the first stage's W at its own tick; with nothing sent between, that is the same
time). The last stage still writes its carries: its B sends at once, so its W cannot join it.

Since each carry takes its own layer's residual slot and a joined pair runs B, then W on B's
carry, with a barrier between (in place of the fused backward, whose temporaries were higher
compiled for TPU), two runs alternating with two of the build before: pinned_zb_ratio 0.93,
0.87 against 0.92, 0.94; pinned_gpipe_ratio 1.03, 1.04 against 1.00, 1.05. Three more runs:
0.89, 0.91, 0.95 (gpipe 1.04, 1.06, 1.03); bubbles 1f1b 0.44 against its table's 0.40-0.43,
zb_h1 0.39-0.43 against 0.24-0.29, gpipe 0.46-0.48 against 0.22-0.26.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

WORKER = "--worker_out"
if any(a.split("=")[0] == WORKER for a in sys.argv):  # a stage process: pin it before JAX
    # starts any thread
    os.sched_setaffinity(0, {int(os.environ["JAXPIPE_PROCESS_ID"]) % os.cpu_count()})
    os.dup2(2, 1)  # what the runtime prints (gloo's connection lines) stays out of the JSON
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import bench_json  # noqa: E402
import jax  # noqa: E402
import launch_local  # noqa: E402
import numpy as np  # noqa: E402
from bench_zero_bubble import _median_seconds, stage_ops  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxpipe import cli  # noqa: E402
from jaxpipe import model as M  # noqa: E402
from jaxpipe.config import ConfigError, PipelineConfig, get_preset  # noqa: E402
from jaxpipe.mesh import initialize_distributed, make_mesh  # noqa: E402
from jaxpipe.pipeline import Pipeline  # noqa: E402
from jaxpipe.schedule import executor_table  # noqa: E402
from jaxpipe.simulate import simulate  # noqa: E402

SENDS = 16  # ppermutes per timed program when measuring one send

SCHEDULES = ("1f1b", "zb_h1", "gpipe")


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="bench_pinned.py", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--timeout_s", type=float, default=900.0)
    p.add_argument("--json_out", default=None, help="also write the JSON here")
    p.add_argument(WORKER, default=None, help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    return p


def link_seconds(mesh, shape, reps: int) -> float:
    """Seconds of one `ppermute` of an activation of `shape` around the `pipe` ring (between
    the processes), from a loop of SENDS of them."""
    S = mesh.shape["pipe"]
    perm = [(i, (i + 1) % S) for i in range(S)]

    def ring(x):
        step = lambda c, _: (jax.lax.ppermute(c, "pipe", perm), None)
        return jax.lax.scan(step, x, None, length=SENDS)[0]

    sends = jax.jit(jax.shard_map(ring, mesh=mesh, in_specs=P("pipe"), out_specs=P("pipe")))
    x = jax.device_put(np.zeros((S, *shape), np.float32), NamedSharding(mesh, P("pipe")))
    return _median_seconds({"sends": (sends, (x,))}, reps)["sends"] / SENDS


def worker(args) -> dict:
    """One stage process: compile and time every schedule's step (SPMD over all processes)."""
    jax.config.update("jax_num_cpu_devices", 1)
    initialize_distributed()
    S, Mb = args.stages, args.microbatches
    cfg = get_preset(args.preset, num_layers=2 * S, max_seq_len=args.seq_len)
    x_BTD = jax.random.normal(jax.random.key(2), (args.batch // Mb, args.seq_len, cfg.d_model))
    ops = stage_ops(cfg, 2, x_BTD, args.reps)
    t = {k: v["seconds"] for k, v in ops.items()}
    params = M.init_params(cfg, 0)
    tokens = np.asarray(
        jax.random.randint(jax.random.key(1), (args.batch, args.seq_len + 1), 0, cfg.vocab_size)
    )
    steps = {}
    for schedule in SCHEDULES:
        pcfg = PipelineConfig(num_stages=S, num_microbatches=Mb, schedule=schedule)
        pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()))
        placed = pipe.place(params)
        toks = jax.device_put(tokens, pipe.batch_sharding())
        steps[schedule] = (pipe.jit(pipe.value_and_grad).lower(placed, toks).compile(),
                           (placed, toks))
    median = _median_seconds(steps, args.reps)
    link = link_seconds(pipe.mesh, x_BTD.shape, args.reps)
    out = {}
    for schedule in SCHEDULES:
        table = executor_table(schedule, S, Mb)
        if table.split:
            work = Mb * (t["F"] + t["B"] + t["W"])
            sim = simulate(table, t["F"], t["B"], link, lockstep=True, wgt_time=t["W"])
        else:
            work = Mb * (t["F"] + t["fused"])
            sim = simulate(table, t["F"], t["fused"], link, lockstep=True)
        sim = sim.step_time
        bubble, table_bubble = 1 - work / median[schedule], 1 - work / sim
        out[schedule] = {"step_s": median[schedule], "bubble": bubble,
                         "table_bubble": table_bubble, "bubble_gap": bubble - table_bubble}
    return {
        "pinned_zb_ratio": median["zb_h1"] / median["1f1b"],
        "pinned_gpipe_ratio": median["gpipe"] / median["1f1b"],
        "schedules": out,
        "stage_ops": ops,
        "link_s": link,
        "process": jax.process_index(),
        "cores": sorted(os.sched_getaffinity(0)),
    }


def measure(args) -> dict:
    """Launches the stage processes and returns process 0's figures."""
    if args.stages < 2 or args.microbatches < 1 or args.reps < 1:
        raise ConfigError("--stages must be >= 2, --microbatches and --reps >= 1")
    if args.stages > (os.cpu_count() or 1):
        raise ConfigError(f"--stages {args.stages} needs as many cores; this host has "
                          f"{os.cpu_count()}")
    if args.batch % args.microbatches:
        raise ConfigError(f"--batch {args.batch} must divide by --microbatches")
    flags = [f"--{k}={v}" for k, v in vars(args).items()
             if k not in ("worker_out", "json_out", "devices", "timeout_s")]
    tmp = tempfile.mkdtemp(prefix="bench_pinned_")
    out = os.path.join(tmp, "process_0.json")
    code = launch_local.launch(flags + [f"{WORKER}={out}"], args.stages, 1,
                               script=__file__, log_dir=tmp, timeout_s=args.timeout_s)
    if code != 0 or not os.path.exists(out):  # the logs stay for reading
        raise RuntimeError(f"stage processes exited with {code}; their logs are in {tmp}")
    with open(out) as f:
        result = json.load(f)
    shutil.rmtree(tmp)
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("worker_out", "devices")}
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker_out:
        def run():
            result = worker(args)
            if result["process"] == 0:
                with open(args.worker_out, "w") as f:
                    json.dump(result, f)
        return cli.guard(run)
    return cli.guard(lambda: bench_json.emit(measure(args), args.json_out))


if __name__ == "__main__":
    sys.exit(main())
