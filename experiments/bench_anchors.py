"""The planner against published Megatron-LM runs (`jaxpipe.anchors`), and the autotuner's pick.

    python experiments/bench_anchors.py [--search]

For each anchor prints the published and predicted TFLOP/s per GPU (Eq. 3) as JSON; with
--search also runs the autotuner on the same GPUs and batch and says how its pick differs from
the published configuration. About 30 s on a 2-core host (plus about a minute per search).
"""

from __future__ import annotations

import sys

from bench_json import emit

from jaxpipe import cli
from jaxpipe.anchors import ANCHORS, predict
from jaxpipe.autotune import Cluster, LayerCosts, search


def _describe(pipe_cfg) -> str:
    p = pipe_cfg
    return (f"data {p.data_parallel} x pipe {p.num_stages} x tensor {p.tensor_parallel}, "
            f"{p.schedule} R={p.num_repeats}, M={p.num_microbatches}, remat {p.remat}, "
            f"embed/head {p.embed_head}")


def run(do_search: bool) -> dict:
    out = {}
    for a in ANCHORS:
        costs = LayerCosts.compile(a.model_cfg, a.seq_len)
        plan = predict(a, costs)
        row = {
            "published_tflops": a.published_tflops,
            "predicted_tflops": a.tflops(plan.step_time_s),
            "error": a.tflops(plan.step_time_s) / a.published_tflops - 1,
            "fitted_to_this_run": a.fitted,
            "step_time_s": plan.step_time_s,
            "bubble": plan.bubble_fraction,
            "configuration": _describe(a.pipe_cfg),
        }
        if do_search:
            found = search(a.model_cfg, Cluster(a.num_devices, "a100-80gb", 8),
                           global_batch=a.global_batch, seq_len=a.seq_len, top=3,
                           layer_costs=costs)
            best = found.best
            row.update({
                "autotune_step_time_s": best.plan.step_time_s,
                "autotune_tflops": a.tflops(best.plan.step_time_s),
                "autotune_configuration": _describe(best.pipe_cfg),
                "autotune_seconds": found.elapsed_s,
                "autotune_vs_published": plan.step_time_s / best.plan.step_time_s,
            })
        out[a.name] = row
    return out


def main(argv=None) -> int:
    ap = cli.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--search", action="store_true", help="also run the autotuner")
    args = ap.parse_args(argv)
    return cli.guard(lambda: emit(run(args.search), None))


if __name__ == "__main__":
    sys.exit(main())
