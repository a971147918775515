"""The autotuner's predictions against measured training steps on forced CPU devices.

    python experiments/bench_autotune.py [--devices 4] [--batch 16] [--seq_len 128]

Runs the autotuner for the `small` model on --devices forced CPU devices (the `cpu` profile,
measured here; its devices share the host's cores, `DeviceProfile.concurrency`), takes its
first choice and other configurations it ranks with different stages, repeats, micro-batches,
schedules and remat (at least --configs), runs each one's real training step (`Trainer`,
median of --reps after a warm-up) and prints JSON: `auto_rank_corr` (Spearman correlation of
predicted and measured step times), `auto_median_error` (median |predicted / measured - 1|),
`auto_pick_vs_best` (the measured step of the autotuner's first choice over the fastest
measured), and every configuration's figures. About 5-10 minutes on a 2-core host.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from bench_json import emit

from jaxpipe import cli


def parser() -> cli.ArgumentParser:
    ap = cli.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--configs", type=int, default=10, help="configurations to measure")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    return ap


def spearman(a, b) -> float:
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def pick(found, costs, n: int):
    """The first choice, then the best-ranked of each new (stages, repeats, micro-batches,
    schedule); remat "layer" variants of the first two, as the autotuner plans them."""
    from jaxpipe.autotune import candidate, plan_for

    chosen, seen = [], set()
    for k in found.candidates:
        p = k.pipe_cfg
        key = (p.num_stages, p.num_repeats, p.num_microbatches, p.schedule)
        if key not in seen:
            seen.add(key)
            chosen.append(k)
        if len(chosen) >= n - 2:
            break
    model_cfg, T = found.model_cfg, found.seq_len
    for k in chosen[:2]:
        p = k.pipe_cfg.replace(remat="layer")
        b = found.global_batch // (p.num_microbatches * p.data_parallel)
        profile = found.cluster.profile(model_cfg, b, T)
        plan = plan_for(model_cfg, p, costs.at(b, p.tensor_parallel), profile)
        if plan is not None:
            chosen.append(candidate(plan, found.global_batch, T, profile))
    return chosen


def measure_step(k, reps: int) -> float:
    import jax

    from jaxpipe.train import TrainConfig, Trainer

    p = k.pipe_cfg
    tcfg = TrainConfig(steps=1, batch_size=k.global_batch, seq_len=k.seq_len)
    trainer = Trainer.create(k.plan.model_cfg, p, tcfg, layout=k.plan.layout,
                             devices=jax.devices()[: p.num_devices])
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (k.global_batch, k.seq_len + 1)).astype(np.int32)
    batch = trainer.put_batch(tokens)
    state, m = trainer.step_fn(state, batch)  # compiles
    jax.block_until_ready(m)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, m = trainer.step_fn(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(args) -> dict:
    from jaxpipe.autotune import Cluster, LayerCosts, search
    from jaxpipe.config import get_preset

    model_cfg = get_preset("small")
    costs = LayerCosts.compile(model_cfg, args.seq_len)
    found = search(model_cfg, Cluster(args.devices, "cpu"), global_batch=args.batch,
                   seq_len=args.seq_len, top=200, layer_costs=costs)
    rows = []
    for k in pick(found, costs, args.configs):
        measured = measure_step(k, args.reps)
        p = k.pipe_cfg
        rows.append({
            "mesh": k.mesh(), "schedule": p.schedule, "R": p.num_repeats,
            "M": p.num_microbatches, "remat": p.remat, "embed_head": p.embed_head,
            "predicted_s": k.plan.step_time_s, "measured_s": measured,
        })
        print(rows[-1], file=sys.stderr, flush=True)
    pred = np.array([r["predicted_s"] for r in rows])
    meas = np.array([r["measured_s"] for r in rows])
    return {
        "auto_rank_corr": spearman(pred, meas),
        "auto_median_error": float(np.median(np.abs(pred / meas - 1))),
        "auto_pick_vs_best": float(meas[0] / meas.min()),
        "devices": args.devices,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "search_s": found.elapsed_s,
        "configs": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import jax

    from jaxpipe.mesh import force_cpu_devices

    if not os.environ.get("JAX_PLATFORMS"):  # before JAX starts: forced CPU devices
        jax.config.update("jax_platforms", "cpu")
    force_cpu_devices(args.devices)
    return cli.guard(lambda: emit(run(args), args.out))


if __name__ == "__main__":
    sys.exit(main())
