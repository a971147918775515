"""State sharding benchmark: ZeRO-1 / FSDP step-time ratios and the 70B compile, as JSON.

    python experiments/bench_sharding.py [--json out.json] [--noaot]

Keys (targets in brackets):
  zero1_step_ratio   training step with ZeRO-1 / with the optimizer replicated over `data`,
                     `small` model, data 2 x pipe 2 x tensor 2 on 8 CPU devices     [<= 1.10]
  fsdp_step_ratio    the same with FSDP                                              [<= 1.25]
  opt_bytes_ratio    per-device optimizer-state bytes, ZeRO-1 / replicated, data 4   [<= 0.30]
  vocab_bytes_ratio  per-device embedding + head bytes of llama-3-70b (abstract shapes),
                     vocabulary split over tensor 2 / replicated                       [<= 0.55]
  aot_70b_seconds    `python -m jaxpipe.plan --aot` of llama-3-70b on v5p:4x4x4 (data 4 x
                     pipe 8 x tensor 2, 1f1b, 16 micro-batches, batch 256 x 4096, remat
                     layer, ZeRO-1): wall seconds of `aot.compile_step`                [<= 300]
  aot_70b            that compile's per-device memory, fits, and the planner's ratio
Step times alternate between the configurations compared and report medians.
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import bench_json
from absl import app, flags

flags.DEFINE_string("json", None, "Write the results here as well as to stdout.")
flags.DEFINE_integer("rounds", 7, "Alternating timing rounds.")
flags.DEFINE_integer("batch_size", 16, "Global batch (sequences).")
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
flags.DEFINE_bool("aot", True, "Compile llama-3-70b for v5p:4x4x4 (needs the tpu extra).")
_F = flags.FLAGS


def main(argv):
    del argv
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np

    from jaxpipe import aot, get_preset
    from jaxpipe.config import PipelineConfig
    from jaxpipe.train import TrainConfig, Trainer

    model = get_preset("small")
    tcfg = TrainConfig(batch_size=_F.batch_size, seq_len=_F.seq_len)
    tokens = np.random.RandomState(0).randint(0, model.vocab_size, (_F.batch_size, _F.seq_len + 1))
    runs = {}
    for name, kw in {"replicated": {}, "zero1": {"zero1": True}, "fsdp": {"fsdp": True}}.items():
        pcfg = PipelineConfig(
            num_stages=2, num_microbatches=4, data_parallel=2, tensor_parallel=2, **kw
        )
        trainer = Trainer.create(model, pcfg, tcfg)
        state = trainer.init_state()
        batch = trainer.put_batch(tokens.astype(np.int32))
        state, _ = trainer.step_fn(state, batch)  # compile
        runs[name] = [trainer, state, batch, []]
    for _ in range(_F.rounds):
        for run in runs.values():
            trainer, state, batch, times = run
            t = time.perf_counter()
            state, metrics = trainer.step_fn(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
            run[1] = state
    median = {name: statistics.median(run[3]) for name, run in runs.items()}

    def bytes_per_device(tree) -> int:
        return sum(
            int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
            for a in jax.tree.leaves(tree)
        )

    opt = {}
    for zero1 in (False, True):
        pcfg = PipelineConfig(num_stages=2, num_microbatches=4, data_parallel=4, zero1=zero1)
        opt[zero1] = bytes_per_device(Trainer.create(model, pcfg, tcfg).abstract_state().opt_state)
    big = get_preset("llama-3-70b", dtype="bfloat16")
    pcfg = PipelineConfig(num_stages=4, num_microbatches=4, tensor_parallel=2)
    outer = Trainer.create(big, pcfg, TrainConfig(batch_size=4, seq_len=128)).abstract_state()
    outer = {k: outer.params[k] for k in ("embed", "head")}
    whole = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(outer))
    result = {
        "zero1_step_ratio": median["zero1"] / median["replicated"],
        "fsdp_step_ratio": median["fsdp"] / median["replicated"],
        "opt_bytes_ratio": opt[True] / opt[False],
        "vocab_bytes_ratio": bytes_per_device(outer) / whole,
        "step_seconds": median,
    }
    if _F.aot and importlib.util.find_spec("libtpu") is not None:
        pcfg = PipelineConfig(
            num_stages=8, num_microbatches=16, data_parallel=4, tensor_parallel=2,
            schedule="1f1b", remat="layer", zero1=True,
        )
        t = time.perf_counter()
        report = aot.compile_step(
            get_preset("llama-3-70b", dtype="bfloat16"), pcfg, batch_size=256, seq_len=4096,
            topology="v5p:4x4x4",
        )
        result["aot_70b_seconds"] = time.perf_counter() - t
        result["aot_70b"] = {
            "fits": report.fits,
            "memory": report.memory,
            "hbm_bytes": report.hbm_bytes,
            "predicted_bytes": report.predicted_bytes,
            "compile_s": report.compile_s,
        }
    elif _F.aot:
        result["aot_70b_seconds"] = None
        result["aot_70b"] = "skipped: libtpu is not installed (pip install 'jaxpipe[tpu]')"
    bench_json.emit(result, _F.json)


if __name__ == "__main__":
    app.run(main)
