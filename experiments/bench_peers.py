"""jaxpipe against torch.distributed.pipelining on the same model, per token, printed as JSON.

    PYTHONPATH=. python experiments/bench_peers.py

(about 2-3 minutes on 2 cores; needs torch, e.g. `pip install torch`). Both sides run jaxpipe's
`small` GPT-2-style model (8 layers, d_model 128, 4 heads, d_ff 512, vocab 256; `torch_gpt.py`
is the torch copy) from the same initial parameters, on the same batch (32 x 128 tokens). Before
timing, the script checks that both frameworks compute the same loss from those parameters (the
unpipelined torch model against `model.reference_loss`, then every pipelined step's first loss)
to --rtol relative, and exits 1 with `error: ...` otherwise.

A step is forward + backward (loss and every parameter's gradient, no optimizer):
  jaxpipe unpipelined  `jax.jit(jax.value_and_grad(model.reference_loss))` on one CPU device
                       (plain jit, XLA's default options; with --remat layer each block of its
                       layer scan is under `jax.checkpoint`).
  jaxpipe gpipe/1f1b   `Pipeline.jit(pipe.value_and_grad)` with S=4 stages and M=16 micro-batches
                       on 4 forced CPU devices in this process (embedding and head outside the
                       pipeline, jaxpipe's default; --embed_head inside moves them into it;
                       --remat layer sets PipelineConfig.remat="layer").
  torch unpipelined    forward, `F.cross_entropy`, `.backward()` in this process on
                       --torch_threads intra-op threads (default: every core).
  torch gpipe/1f1b     `ScheduleGPipe` / `Schedule1F1B` with M=16, one gloo process per stage
                       (4 stages of 2 layers; embedding on stage 0, head and loss on stage 3, which
                       holds a copy of the tied table whose gradient is all-reduced with stage 0's
                       after the schedule), timed from a barrier before the step to one after it.
                       Each stage process runs --stage_threads intra-op threads (default 1: four
                       processes on two cores already oversubscribe them two to one; more threads
                       per stage only add contention while neighbouring stages wait on messages).

Timing: one warm-up step each, then --rounds rounds; each round runs every variant once, jaxpipe
then torch (unpipelined, gpipe, 1f1b), and the JSON reports medians. CPU seconds per step are the
process CPU time (`time.process_time`, all threads) spent in the step: this process for jaxpipe
and torch unpipelined, the sum over the four stage processes for torch pipelined.

Keys: torch_ratio_{unpipelined,gpipe,1f1b} = jaxpipe tokens/s / torch tokens/s (above 1: jaxpipe
faster); jaxpipe / torch -> variant -> tokens_per_s, cpu_s_per_step, step_s; matmuls: the
seconds one unpipelined step spends in its dense matmuls in each framework, timed alone
(`matmul_seconds`: forward, input_grad, weight_grad, total), and unpipelined_ratio_bound =
torch step / (torch step - torch's matmuls + jaxpipe's), the ratio jaxpipe would reach with
every other op as fast as torch's; loss (the checked losses); config.

Measured on the idle 2-core host, torch 2.13, jax 0.10.2, medians of 5 rounds, one run each of
the command above and of `--remat layer`, after blocks became lean (the backward recomputes
norm statistics, GELU internals and attention's scores instead of stashing them; 9.2 MB a layer
at micro-batch 8 instead of 26.5 MB):
                     jaxpipe tok/s  CPU s/step   torch tok/s  CPU s/step   ratio
  unpipelined            5,965        1.22          8,831        0.90       0.68
  gpipe                  6,119        1.19          7,093        1.04       0.86
  1f1b                   7,054        1.03          7,605        0.96       0.93
  --remat layer:
  unpipelined            5,413        1.30          8,966        0.89       0.60
  gpipe                  5,604        1.30          6,770        1.13       0.83
  1f1b                   6,496        1.09          7,316        1.02       0.89
Since GPipe trains on the forward + backward table (the one executor every schedule's step
runs), one run of the command above: unpipelined 0.64, gpipe 0.88, 1f1b 0.93 (jaxpipe 4,539 /
4,942 / 5,644 tok/s, torch 7,147 / 5,645 / 6,104; the host ran about 25 % slower than on the
day of the table, for both sides).
Three runs of the command above on a later day: unpipelined 0.50, 0.50, 0.52, gpipe 0.79,
0.80, 0.77, 1f1b 0.76, 0.75, 0.79 (jaxpipe 6,750 / 7,047 / 7,225 tok/s and 1.05 / 1.05 / 0.98
CPU s a step, torch 13,377 / 8,934 / 9,553 and 0.61 / 0.84 / 0.79 in the first): torch's
unpipelined step ran 1.5x faster than on the day of the table, jaxpipe's 1.1x. In the third,
the step's dense matmuls alone took 0.202 s in XLA against 0.118 s in torch (forward 0.052
against 0.037, input gradients 0.052 against 0.039, weight gradients x.T @ g 0.098 against
0.042): unpipelined_ratio_bound 0.79, so with every other op as fast as torch's the unpipelined
ratio stays below 0.9. A fourth run, the matmuls timed in one round-robin: 0.50 / 0.77 / 0.74,
matmuls 0.222 s against 0.135 s (weight gradients 0.107 against 0.048), bound 0.77.
A weight gradient on a pre-transposed x (which moves the transpose
elsewhere) takes 2.0-2.1 ms against x.T @ g's 2.6-3.1 ms and torch's 1.8-1.9 ms at 4,096 x
128 x 512 and 4,096 x 512 x 128; other forms ((g.T @ x).T, a batched einsum, chunked sums)
are no faster.
Before lean blocks the default run gave 0.55 / 0.48 / 0.58: the stash's writes and reads of
every intermediate cost more than the block's FLOPs. The unpipelined step is bound by XLA's CPU
code for this model's small matmuls (K = 128): on one core the best formulation of the
reference we found (layers unrolled, attention written out) takes 1.32 s against torch's
0.82 s; XLA's matmul fusions take 0.70 s of it (torch: mm/addmm 0.50 s, fused attention
0.14 s) and materialised broadcasts, transposes and copies ~0.3 s that torch's BLAS calls
avoid with transpose flags.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402 (after JAX_PLATFORMS is set)
import numpy as np  # noqa: E402

from jaxpipe import cli  # noqa: E402
from jaxpipe import model as M  # noqa: E402
from jaxpipe.config import ConfigError, PipelineConfig, get_preset  # noqa: E402
from jaxpipe.costs import best_times  # noqa: E402
from jaxpipe.mesh import force_cpu_devices, make_mesh  # noqa: E402
from jaxpipe.pipeline import Pipeline  # noqa: E402

try:
    import torch_gpt  # noqa: E402 (sits next to this script; imports torch)
except ModuleNotFoundError as e:
    if e.name != "torch":
        raise
    torch_gpt = None

VARIANTS = ("unpipelined", "gpipe", "1f1b")
WORKER_TIMEOUT_S = 600  # a stage process silent this long is stuck


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="bench_peers.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", help="a gpt2-style preset (small, tiny)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtol", type=float, default=1e-5, help="allowed relative loss difference")
    p.add_argument("--embed_head", default="outside", choices=("outside", "inside"))
    p.add_argument("--remat", default="none", choices=("none", "layer"),
                   help="jaxpipe side: recompute each block in the backward (PipelineConfig.remat; "
                        "the unpipelined step checkpoints each block of its layer scan)")
    p.add_argument("--torch_threads", type=int, default=os.cpu_count() or 1,
                   help="intra-op threads of the unpipelined torch step")
    p.add_argument("--stage_threads", type=int, default=1,
                   help="intra-op threads of each torch stage process")
    return p


def _check(args, cfg) -> None:
    for name in ("batch", "seq_len", "stages", "microbatches", "rounds", "torch_threads",
                 "stage_threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.rtol > 0:
        raise ConfigError(f"--rtol must be > 0, got {args.rtol}")
    if args.seq_len > cfg.max_seq_len:
        raise ConfigError(f"--seq_len {args.seq_len} exceeds model {cfg.name!r}'s max_seq_len "
                          f"{cfg.max_seq_len}")
    if cfg.num_layers % args.stages:
        raise ConfigError(f"--stages {args.stages} must divide the {cfg.num_layers} layers of "
                          f"model {cfg.name!r} (the torch pipeline splits them evenly)")
    if args.stages > len(jax.devices()):
        raise ConfigError(f"--stages {args.stages} needs as many devices; {len(jax.devices())} "
                          f"are available")
    PipelineConfig(num_stages=args.stages, num_microbatches=args.microbatches).check_batch(
        args.batch
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerError(RuntimeError):
    """A torch stage process failed, stalled or exited."""


class TorchPipeline:
    """The torch stage processes; `step(schedule)` -> (wall s, CPU s of all stages, loss)."""

    def __init__(self, cfg, params, tokens, args):
        ctx = multiprocessing.get_context("spawn")
        port, self.conns, self.procs = _free_port(), [], []
        for rank in range(args.stages):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=torch_gpt.stage_worker,
                args=(rank, args.stages, port, cfg, params, tokens, args.microbatches,
                      args.stage_threads, theirs),
                daemon=True,
            )
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)
        self._gather()

    def _gather(self) -> list[tuple]:
        replies = []
        for rank, conn in enumerate(self.conns):
            if not conn.poll(WORKER_TIMEOUT_S):
                raise WorkerError(f"torch stage {rank} sent nothing in {WORKER_TIMEOUT_S} s")
            try:
                reply = conn.recv()
            except EOFError:
                raise WorkerError(f"torch stage {rank} exited without a reply") from None
            if reply[0] == "error":
                raise WorkerError(reply[1])
            replies.append(reply)
        return replies

    def step(self, schedule: str) -> tuple[float, float, float]:
        for conn in self.conns:
            conn.send(("step", schedule))
        replies = self._gather()
        return replies[0][1], sum(r[2] for r in replies), replies[-1][3]

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()


def _timed(fn):
    """A step callable returning a loss -> one returning (wall s, CPU s, loss)."""

    def run():
        wall, cpu = time.perf_counter(), time.process_time()
        loss = fn()
        return time.perf_counter() - wall, time.process_time() - cpu, loss

    return run


def _unpipelined_loss(cfg, remat: str, params, tokens_BT1):
    """`model.reference_loss`, with each block checkpointed when remat is "layer"."""
    if remat == "none":
        return M.reference_loss(cfg, params, tokens_BT1)
    x_BTD = M.embed_apply(cfg, params, tokens_BT1[:, :-1])
    x_BTD = M.stack_forward(cfg, params["blocks"], x_BTD, remat=True)
    return M.head_loss(cfg, params, x_BTD, tokens_BT1[:, 1:])


def jax_steps(cfg, params, tokens, args) -> dict:
    """variant -> timed jaxpipe step."""
    dev0 = jax.devices()[0]
    p0, t0 = jax.device_put(params, dev0), jax.device_put(tokens, dev0)
    ref = jax.jit(jax.value_and_grad(functools.partial(_unpipelined_loss, cfg, args.remat)))
    ref = ref.lower(p0, t0).compile()
    steps = {"unpipelined": _timed(lambda: float(jax.block_until_ready(ref(p0, t0))[0]))}
    for schedule in ("gpipe", "1f1b"):
        pcfg = PipelineConfig(num_stages=args.stages, num_microbatches=args.microbatches,
                              schedule=schedule, embed_head=args.embed_head, remat=args.remat)
        pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[: args.stages]))
        placed = pipe.place(params)
        toks = jax.device_put(tokens, pipe.batch_sharding())
        compiled = pipe.jit(pipe.value_and_grad).lower(placed, toks).compile()
        steps[schedule] = _timed(
            lambda c=compiled, p=placed, t=toks: float(jax.block_until_ready(c(p, t))[0])
        )
    return steps


def torch_unpipelined(cfg, params, tokens, threads: int):
    torch_gpt.torch.set_num_threads(threads)
    model = torch_gpt.whole_model(cfg, params)
    t = torch_gpt.torch.from_numpy(tokens.astype(np.int64))
    inputs, targets = t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def step():
        model.zero_grad(set_to_none=True)
        loss = torch_gpt.loss_fn(model(inputs), targets)
        loss.backward()
        return loss.item()

    return _timed(step)


def dense_shapes(cfg) -> dict:
    """(d_in, d_out) -> how many matmuls of that shape one step's forward runs: per block the
    q, k, v and output projections and the MLP's two, then the head's projection onto the
    (tied) vocabulary table."""
    d, hk, f = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.ff_dim
    counts: dict = {}
    for shape, n in (((d, hk), 3), ((hk, d), 1), ((d, f), 1), ((f, d), 1)):
        counts[shape] = counts.get(shape, 0) + n * cfg.num_layers
    counts[(d, cfg.vocab_size)] = counts.get((d, cfg.vocab_size), 0) + 1
    return counts


def matmul_seconds(cfg, tokens: int, threads: int) -> dict:
    """Seconds one unpipelined step spends in its dense matmuls in each framework, alone: for
    every shape of `dense_shapes`, the forward x @ W, the input gradient g @ W.T and the weight
    gradient x.T @ g on [tokens, d_in] and [tokens, d_out] operands (jitted on one device for
    jaxpipe's XLA; torch's BLAS on --torch_threads threads), all timed in one round-robin
    (`costs.best_times`)."""
    torch = torch_gpt.torch
    torch.set_num_threads(threads)
    dev0 = jax.devices()[0]
    forms = {
        "forward": (lambda x, w, g: x @ w),
        "input_grad": (lambda x, w, g: g @ w.T),
        "weight_grad": (lambda x, w, g: x.T @ g),
    }
    shapes = dense_shapes(cfg)
    rng = np.random.default_rng(0)
    calls = {}
    for d_in, d_out in shapes:
        x, w, g = (rng.standard_normal(s, np.float32)
                   for s in ((tokens, d_in), (d_in, d_out), (tokens, d_out)))
        for name, form in forms.items():
            calls["jaxpipe", name, d_in, d_out] = (
                jax.jit(form), tuple(jax.device_put(a, dev0) for a in (x, w, g)))
            calls["torch", name, d_in, d_out] = (form, tuple(map(torch.from_numpy, (x, w, g))))
    seconds = best_times(calls)
    out = {side: dict.fromkeys(forms, 0.0) for side in ("jaxpipe", "torch")}
    for (side, name, d_in, d_out), t in seconds.items():
        out[side][name] += shapes[d_in, d_out] * t
    return {side: {**forms_s, "total": sum(forms_s.values())} for side, forms_s in out.items()}


def _summary(samples: list, tokens_per_step: int) -> dict:
    step = statistics.median(s[0] for s in samples)
    return {
        "tokens_per_s": tokens_per_step / step,
        "cpu_s_per_step": statistics.median(s[1] for s in samples),
        "step_s": step,
    }


def run(args) -> dict:
    cfg = get_preset(args.model)
    torch_gpt.check_config(cfg)
    _check(args, cfg)
    tokens = np.random.default_rng(args.seed).integers(
        0, cfg.vocab_size, (args.batch, args.seq_len + 1), dtype=np.int32
    )
    params = jax.tree.map(np.asarray, M.init_params(cfg, args.seed))
    ref_loss, torch_loss = torch_gpt.check_loss(cfg, params, tokens, args.rtol)
    print(f"losses agree: jaxpipe {ref_loss:.7f}, torch {torch_loss:.7f}", file=sys.stderr)

    steps = {"jaxpipe": jax_steps(cfg, params, tokens, args)}
    workers = TorchPipeline(cfg, params, tokens, args)
    try:
        steps["torch"] = {
            "unpipelined": torch_unpipelined(cfg, params, tokens, args.torch_threads),
            "gpipe": functools.partial(workers.step, "gpipe"),
            "1f1b": functools.partial(workers.step, "1f1b"),
        }
        first = {}
        for variant in VARIANTS:  # warm-up; every first loss must match the reference
            for side in steps:
                loss = steps[side][variant]()[2]
                torch_gpt.check_close(f"{side} {variant}", loss, ref_loss, args.rtol)
                first[f"{side}_{variant}"] = loss
        samples = {side: {v: [] for v in VARIANTS} for side in steps}
        for r in range(args.rounds):
            for variant in VARIANTS:
                for side in steps:
                    samples[side][variant].append(steps[side][variant]())
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        workers.close()

    n = args.batch * args.seq_len
    out = {side: {v: _summary(samples[side][v], n) for v in VARIANTS} for side in samples}
    result = {
        f"torch_ratio_{v}": out["jaxpipe"][v]["tokens_per_s"] / out["torch"][v]["tokens_per_s"]
        for v in VARIANTS
    }
    result.update(out)
    mm = matmul_seconds(cfg, n, args.torch_threads)
    torch_step = out["torch"]["unpipelined"]["step_s"]
    result["matmuls"] = {
        **mm,
        # jaxpipe's step with every op but its dense matmuls as fast as torch's
        "unpipelined_ratio_bound": torch_step
        / (torch_step - mm["torch"]["total"] + mm["jaxpipe"]["total"]),
    }
    result["loss"] = {"jaxpipe_reference": ref_loss, "torch_unpipelined_check": torch_loss,
                      **first}
    result["config"] = {**vars(args), "cpu_cores": os.cpu_count(),
                        "torch": torch_gpt.torch.__version__, "jax": jax.__version__}
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if torch_gpt is None:
        cli.fail("torch is not installed; install it (pip install torch) to run the torch side")
    if jax.config.jax_platforms == "cpu":
        force_cpu_devices(args.stages)

    def body():
        try:
            print(json.dumps(run(args), indent=1))
        except (torch_gpt.LossMismatch, WorkerError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        return 0

    return cli.guard(body)

if __name__ == "__main__":
    sys.exit(main())
