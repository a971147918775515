"""Where a compiled training step spends its time on CPU: XLA's per-op (thunk) times, as JSON.

    PYTHONPATH=. python experiments/profile_step.py --step reference
    PYTHONPATH=. python experiments/profile_step.py --step gpipe --remat layer

Compiles forward + backward of the `small` model (batch 32 x 128) as jaxpipe's unpipelined
reference (`jax.value_and_grad(model.reference_loss)` on one of 4 forced CPU devices, as in
bench_peers.py) or pipelined (gpipe, 1f1b or zb_h1) with S=4, M=16
(`Pipeline.jit(pipe.value_and_grad)`), traces --steps steps with `jax.profiler`, and sums
the duration of every op XLA ran, over all threads, per step:
  by_kind   dot / elementwise fusions (`ynn_fusion` is XLA CPU's YNNPACK fusion: a matmul or an
            elementwise chain), broadcast (mostly zero-filling a loop's stacked residual buffers),
            dynamic-update-slice / dynamic-slice (writing and reading them), copy, transpose,
            select (the causal mask), collectives, and `wait` (rendezvous of the pipelined
            devices at each tick's ppermute: time blocked, not computing);
  top       the most expensive ops with their output shapes;
  threads   the profiled threads by name (XLA's intra-op pool is `tf_XLAEigen`).
Durations are wall time of each op on its thread, so on an oversubscribed machine (4 forced
devices on 2 cores) they overstate CPU work; compare shares, and `cpu_s_per_step`. About a minute.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402 (after JAX_PLATFORMS is set)
import numpy as np  # noqa: E402

from jaxpipe import cli  # noqa: E402
from jaxpipe import model as M  # noqa: E402
from jaxpipe.config import ConfigError, PipelineConfig, get_preset  # noqa: E402
from jaxpipe.mesh import force_cpu_devices, make_mesh  # noqa: E402
from jaxpipe.pipeline import Pipeline  # noqa: E402

# Events that contain other ops (loops, executors) or are not XLA ops, left out of the sums.
_CONTAINERS = re.compile(r"^(ThunkExecutor|\$|SlinkyThreadPool|while|call|conditional|PjRt|Tfrt)")
_WAITS = re.compile(r"^(Rendezvous|Wait|ppermute|collective-permute|all-reduce)")
_KINDS = ("ynn_fusion", "dot", "broadcast", "dynamic-update-slice", "dynamic-slice", "copy",
          "transpose", "select", "reduce", "fusion")


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="profile_step.py", description=__doc__.splitlines()[0])
    p.add_argument("--step", default="reference", choices=("reference", "gpipe", "1f1b", "zb_h1"))
    p.add_argument("--remat", default="none", choices=("none", "layer"))
    p.add_argument("--model", default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="traced steps")
    p.add_argument("--top", type=int, default=15, help="ops listed by name")
    return p


def _kind(name: str) -> str:
    if _WAITS.match(name):
        return "wait / collective"
    return next((k for k in _KINDS if k in name), "other")


def _compiled(args, cfg, params, tokens):
    """(compiled step, its arguments)."""
    if args.step == "reference":

        def loss(p, t):
            if args.remat == "none":
                return M.reference_loss(cfg, p, t)
            x = M.stack_forward(cfg, p["blocks"], M.embed_apply(cfg, p, t[:, :-1]), remat=True)
            return M.head_loss(cfg, p, x, t[:, 1:])

        step = jax.jit(jax.value_and_grad(loss))
        return step.lower(params, tokens).compile(), (params, tokens)
    pcfg = PipelineConfig(num_stages=args.stages, num_microbatches=args.microbatches,
                          schedule=args.step, remat=args.remat)
    pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[: args.stages]))
    placed = pipe.place(params)
    toks = jax.device_put(tokens, pipe.batch_sharding())
    return pipe.jit(pipe.value_and_grad).lower(placed, toks).compile(), (placed, toks)


def profile(args) -> dict:
    if args.steps < 1 or args.top < 0:
        raise ConfigError("--steps must be >= 1 and --top >= 0")
    cfg = get_preset(args.model)
    tokens = np.random.default_rng(0).integers(
        0, cfg.vocab_size, (args.batch, args.seq_len + 1), dtype=np.int32
    )
    compiled, step_args = _compiled(args, cfg, M.init_params(cfg, 0), tokens)
    hlo = compiled.as_text()
    jax.block_until_ready(compiled(*step_args))
    with tempfile.TemporaryDirectory() as trace_dir:
        wall, cpu = time.perf_counter(), time.process_time()
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                jax.block_until_ready(compiled(*step_args))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    per_op, threads = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            threads[line.name.split("/")[0]] += 1
            if not line.name.startswith("tf_XLA"):
                continue
            for event in line.events:
                if not _CONTAINERS.match(event.name):
                    per_op[event.name] += event.duration_ns / 1e6 / args.steps
    total = sum(per_op.values())
    by_kind = collections.Counter()
    for name, ms in per_op.items():
        by_kind[_kind(name)] += ms

    def shape(name):
        m = re.search(r"^\s*(?:ROOT )?%?" + re.escape(name) + r" = (\S+) ", hlo, re.M)
        return m.group(1) if m else None

    return {
        "step": args.step,
        "remat": args.remat,
        "wall_s_per_step": wall / args.steps,  # with the profiler on
        "cpu_s_per_step": cpu / args.steps,
        "op_ms_per_step": total,
        "by_kind": {k: {"ms": ms, "share": ms / total} for k, ms in by_kind.most_common()},
        "top": [{"op": n, "ms": ms, "shape": shape(n)} for n, ms in per_op.most_common(args.top)],
        "threads": dict(threads),
        "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if jax.config.jax_platforms == "cpu":
        force_cpu_devices(args.stages)  # as in bench_peers.py, the reference too
    profile_fn = functools.partial(profile, args)
    return cli.guard(lambda: print(json.dumps(profile_fn(), indent=1)))


if __name__ == "__main__":
    sys.exit(main())
