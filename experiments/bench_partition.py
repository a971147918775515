"""Partitioner benchmarks, printed as JSON.

    PYTHONPATH=. JAX_PLATFORMS=cpu python experiments/bench_partition.py [--only NAME]

About 2-4 minutes on a 2-core CPU host. Figures:
  cost_vs_uniform: step time of the `cost` plan (and of the `profile` plan) / the `uniform` plan
    for a model whose head is expensive (width 128, vocab 32000, 48 layers, 4 stages, M = 8),
    predicted by the planner's own step-time model (the executor's table simulated tick by
    tick) fed with measured per-layer times; target <= 0.85.
  predict_error: max over stages of |predicted - measured| / measured stage time on this CPU,
    for the roofline with the calibrated `cpu` profile and for `profile` (measured layers).
  plan_seconds: wall time of a gpt3-175b `cost` plan on 8 tpu-v5p stages; target <= 60.

Measured on a 2-core host (separate runs): cost_vs_uniform 0.616, 0.622, 0.633 for the `cost`
plan (0.653, 0.650, 0.633 for `profile`; uniform is E+t*12 | ... | t*12+H, cost e.g.
E+t*15 | t*16 | t*16 | t*1+H); predict_error 0.122, 0.046, 0.088 for the cpu roofline
calibrated on the model's own block and head, 0.126, 0.079, 0.036 for `profile`; plan_seconds
2.7-3.6. The host's speed drifts by 10-30% within a minute, which bounds both errors.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from jaxpipe import cli
from jaxpipe.config import PipelineConfig, get_preset
from jaxpipe.measure import measure_layer_times, measure_stage_times
from jaxpipe.partition import build_plan, make_plan


def cost_vs_uniform() -> dict:
    cfg = get_preset("small").replace(name="small-32k", num_layers=48, vocab_size=32000)
    pcfg = PipelineConfig(4, 8)
    shape = dict(batch_size=16, seq_len=64)
    plans = {m: make_plan(cfg, pcfg, m, **shape) for m in ("uniform", "cost", "profile")}
    lt = measure_layer_times(cfg, pcfg, **shape)
    out = {"layer_times_s": lt}
    for m, plan in plans.items():
        cm = dataclasses.replace(
            plan.cost_model, block_time=lt["block"], embed_time=lt["embed"], head_time=lt["head"]
        )
        measured = build_plan(cfg, pcfg, plan.layout, cm, m, plan.device)
        out[m] = {
            "layout": plan.layout_string(),
            "stage_s": measured.stage_times,
            "step_s": measured.step_time_s,
        }
    out["ratio"] = out["cost"]["step_s"] / out["uniform"]["step_s"]
    out["ratio_profile"] = out["profile"]["step_s"] / out["uniform"]["step_s"]
    return out


def predict_error() -> dict:
    cfg = get_preset("small")
    pcfg = PipelineConfig(4, 4)
    shape = dict(batch_size=8, seq_len=128)
    out = {}
    for method in ("cost", "profile"):
        plan = make_plan(cfg, pcfg, method, **shape)
        meas = measure_stage_times(cfg, pcfg, plan.layout, reps=10, **shape)
        pred = [t - plan.cost_model.transfer_time for t in plan.stage_times]
        err = max(abs(p - m) / m for p, m in zip(pred, meas.stage_s, strict=True))
        out[method] = {
            "layout": plan.layout_string(),
            "predicted_s": pred,
            "measured_s": list(meas.stage_s),
            "max_rel_error": err,
        }
    return out


def plan_seconds() -> dict:
    t0 = time.perf_counter()
    plan = make_plan(
        get_preset("gpt3-175b", dtype="bfloat16"),
        PipelineConfig(8, 32),
        "cost",
        batch_size=32,
        seq_len=2048,
        device="tpu-v5p",
    )
    return {"seconds": time.perf_counter() - t0, "layout": plan.layout_string()}


BENCHES = {
    "cost_vs_uniform": cost_vs_uniform,
    "predict_error": predict_error,
    "plan_seconds": plan_seconds,
}


def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="bench_partition.py")
    ap.add_argument("--only", choices=list(BENCHES), default=None)
    args = ap.parse_args(argv)
    names = [args.only] if args.only else list(BENCHES)
    return cli.guard(lambda: print(json.dumps({n: BENCHES[n]() for n in names}, indent=2)))


if __name__ == "__main__":
    sys.exit(main())
