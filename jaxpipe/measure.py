"""Measured layer and stage times on the real devices.

`measure_layer_times` times compiled single layers (block, embedding, head + loss; forward +
backward, one micro-batch). `measure_stage_times` times each virtual stage's own compiled
forward + backward program (its blocks unrolled, with the embedding on the first and the head +
loss on the last) and sums a device's repeats.
"""

from __future__ import annotations

import dataclasses

from jaxpipe.config import ModelConfig, PipelineConfig
from jaxpipe.costs import best_times, microbatch_size
from jaxpipe.layout import StageLayout
from jaxpipe.programs import ProgramInputs, layer_programs, stage_program


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
    programs = layer_programs(model_cfg, b, seq_len)
    t = best_times({k: programs[k] for k in ("block", "embed", "head")}, reps)
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
    inp = ProgramInputs(model_cfg, b, seq_len, layout.slots)
    keys = {(n, v == 0, v == V - 1) for v, n in enumerate(layout.layer_counts)}
    seconds = best_times(
        {key: (stage_program(model_cfg, *key), inp.args(*key, model_cfg.tied)) for key in keys},
        reps,
    )
    per_v = [seconds[(n, v == 0, v == V - 1)] for v, n in enumerate(layout.layer_counts)]
    v_SR = layout.v_SR
    stage = tuple(sum(per_v[v] for v in v_SR[s]) for s in range(S))
    layers = layer_times or measure_layer_times(
        model_cfg, pipe_cfg, batch_size=batch_size, seq_len=seq_len, reps=reps
    )
    return StageTimes(stage, layers)
