"""Measured layer and stage times on the real devices, and imbalance detection.

`measure_layer_times` times compiled single layers (block, embedding, head + loss; forward +
backward, one micro-batch). `measure_stage_times` times each virtual stage's own compiled
forward + backward program (its blocks unrolled, with the embedding on the first and the head +
loss on the last) and sums a device's repeats. `check_balance` compares them with a plan and,
when the slowest stage is more than `threshold` x the fastest, re-partitions with the measured
per-layer times.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe import model as M
from jaxpipe.config import ModelConfig, PipelineConfig
from jaxpipe.costs import best_times, microbatch_size
from jaxpipe.layout import StageLayout
from jaxpipe.report import Plan


def _concrete(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [0.02 * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves, strict=True)]
    )


def _stage_program(cfg: ModelConfig, blocks: int, first: bool, last: bool):
    """Forward + backward of one virtual stage: [embed] -> `blocks` blocks -> [head + loss]."""

    def loss(p, inp, tgt, cot):
        h = M.embed_apply(cfg, p, inp) if first else inp
        for j in range(blocks):
            h = M.block_apply(cfg, jax.tree.map(lambda a, j=j: a[j], p["blocks"]), h)
        if last:
            return M.cross_entropy(M.head_apply(cfg, p, h), tgt)
        return jnp.vdot(h.astype(jnp.float32), cot.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1) if not first else 0))


class _Inputs:
    def __init__(self, cfg: ModelConfig, b: int, T: int, max_blocks: int, seed: int = 0):
        small = cfg.replace(num_layers=max_blocks)
        key = jax.random.key(seed)
        self.params = _concrete(M.abstract_params(small), key)
        self.tokens = jax.random.randint(key, (b, T), 0, cfg.vocab_size)
        self.x = 0.1 * jax.random.normal(key, (b, T, cfg.d_model), jnp.dtype(cfg.dtype))

    def args(self, blocks: int, first: bool, last: bool, tied: bool):
        """Only the parameters the stage uses (unused ones would get zero gradients)."""
        p = {"blocks": jax.tree.map(lambda a: a[:blocks], self.params["blocks"])}
        if first or (last and tied):
            p["embed"] = self.params["embed"]
        if last:
            p["head"] = self.params["head"]
        return p, (self.tokens if first else self.x), self.tokens, self.x


def layer_programs(model_cfg: ModelConfig, microbatch: int, seq_len: int) -> dict[str, tuple]:
    """{kind: (jitted fwd + bwd program, args)} at one micro-batch: "block" is one block,
    "embed" the embedding + one block, "head" one block + the head and loss (a layer's time is
    its program's minus the block's)."""
    inp = _Inputs(model_cfg, microbatch, seq_len, 1)
    kinds = {"block": (1, False, False), "embed": (1, True, False), "head": (1, False, True)}
    return {
        k: (_stage_program(model_cfg, *key), inp.args(*key, model_cfg.tied))
        for k, key in kinds.items()
    }


def measure_layer_times(
    model_cfg: ModelConfig,
    pipe_cfg: PipelineConfig,
    *,
    batch_size: int,
    seq_len: int,
    reps: int = 5,
) -> dict[str, float]:
    """Seconds of fwd + bwd of one block, the embedding and the head + loss, one micro-batch."""
    b = microbatch_size(pipe_cfg, batch_size)
    t = best_times(layer_programs(model_cfg, b, seq_len), reps)
    block = t["block"]
    embed = max(t["embed"] - block, 0.0)
    head = max(t["head"] - block, 0.0)
    return {"block": block, "embed": embed, "head": head}


@dataclasses.dataclass(frozen=True)
class StageTimes:
    stage_s: tuple[float, ...]  # per device, sum over its repeats
    layer_s: dict  # measured single-layer times ("block", "embed", "head")


def measure_stage_times(
    model_cfg: ModelConfig,
    pipe_cfg: PipelineConfig,
    layout: StageLayout,
    *,
    batch_size: int,
    seq_len: int,
    reps: int = 5,
    layer_times: dict[str, float] | None = None,
) -> StageTimes:
    """Each device's measured fwd + bwd seconds per micro-batch under `layout`, with the
    single-layer times (measured here unless `layer_times` from `measure_layer_times` is given)."""
    S, V = layout.num_stages, layout.num_stages * layout.num_repeats
    b = microbatch_size(pipe_cfg, batch_size)
    inp = _Inputs(model_cfg, b, seq_len, layout.slots)
    keys = {(n, v == 0, v == V - 1) for v, n in enumerate(layout.layer_counts)}
    seconds = best_times(
        {key: (_stage_program(model_cfg, *key), inp.args(*key, model_cfg.tied)) for key in keys},
        reps,
    )
    per_v = [seconds[(n, v == 0, v == V - 1)] for v, n in enumerate(layout.layer_counts)]
    stage = tuple(sum(per_v[r * S + s] for r in range(layout.num_repeats)) for s in range(S))
    layers = layer_times or measure_layer_times(
        model_cfg, pipe_cfg, batch_size=batch_size, seq_len=seq_len, reps=reps
    )
    return StageTimes(stage, layers)


@dataclasses.dataclass(frozen=True)
class BalanceReport:
    ratio: float  # measured slowest / fastest stage
    predicted_s: tuple[float, ...]  # the plan's compute time per stage (no link transfer)
    measured_s: tuple[float, ...]
    max_error: float  # max |predicted - measured| / measured
    suggestion: Plan | None  # re-partition from measured layer times, when ratio > threshold


def check_balance(plan: Plan, measured: StageTimes, threshold: float = 1.2) -> BalanceReport:
    """Predicted vs measured stage times; suggests a re-partition when imbalance > threshold."""
    from jaxpipe.partition import replan

    cm = plan.cost_model
    R = plan.pipe_cfg.num_repeats
    predicted = np.array(plan.stage_times) - R * cm.transfer_time
    meas = np.array(measured.stage_s)
    ratio = float(meas.max() / meas.min())
    suggestion = None
    if ratio > threshold:
        lt = measured.layer_s
        cm_meas = dataclasses.replace(
            cm, block_time=lt["block"], embed_time=lt["embed"], head_time=lt["head"]
        )
        suggestion = replan(plan, cm_meas, method="measured")
    return BalanceReport(
        ratio=ratio,
        predicted_s=tuple(predicted.tolist()),
        measured_s=tuple(meas.tolist()),
        max_error=float(np.max(np.abs(predicted - meas) / meas)),
        suggestion=suggestion,
    )
