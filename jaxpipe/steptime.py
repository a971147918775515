"""Measured training steps: the real executor and optimizer, timed on the devices present.

`measure_steps` builds a `Trainer` for each configuration, compiles its step, and times the
steps round-robin, so that every configuration sees the same machine conditions (on a shared
host, timing one configuration after another can differ by tens of percent). The autotuner
fits a measured CPU profile to such steps (`autotune.fit_executor`), and
`experiments/bench_autotune.py` checks its predictions against them.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from jaxpipe.agree import process0_floats
from jaxpipe.config import ModelConfig, PipelineConfig
from jaxpipe.layout import StageLayout
from jaxpipe.train import TrainConfig, Trainer


@dataclasses.dataclass(frozen=True)
class StepRun:
    """One configuration to time: the model, its pipeline, its layer split, the batch."""

    model_cfg: ModelConfig
    pipe_cfg: PipelineConfig
    layout: StageLayout | None
    global_batch: int
    seq_len: int


def measure_steps(runs: list[StepRun], reps: int = 5, seed: int = 0) -> list[float]:
    """Each run's fastest of `reps` training steps (forward, backward and the AdamW update) on
    the first `pipe_cfg.num_devices` devices, after a compiling first step; the runs are timed
    round-robin. The tokens are random. With several processes every process calls this with
    the same runs (the steps are collectives) and gets process 0's figures."""
    live = []
    for run in runs:
        p = run.pipe_cfg
        tcfg = TrainConfig(steps=1, batch_size=run.global_batch, seq_len=run.seq_len)
        trainer = Trainer.create(run.model_cfg, p, tcfg, layout=run.layout,
                                 devices=jax.devices()[: p.num_devices])
        tokens = np.random.default_rng(seed).integers(
            0, run.model_cfg.vocab_size, (run.global_batch, run.seq_len + 1)
        )
        batch = trainer.put_batch(tokens.astype(np.int32))
        state, metrics = trainer.step_fn(trainer.init_state(), batch)  # compiles
        jax.block_until_ready(metrics)
        live.append([trainer, state, batch])
    best = [float("inf")] * len(live)
    for _ in range(reps):
        for i, entry in enumerate(live):
            trainer, state, batch = entry
            t0 = time.perf_counter()
            entry[1], metrics = trainer.step_fn(state, batch)
            jax.block_until_ready(metrics)
            best[i] = min(best[i], time.perf_counter() - t0)
    return list(process0_floats(best))
