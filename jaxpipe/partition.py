"""Stage sizes from layer costs: the `uniform`, `cost`, `memory` and `profile` methods.

A device's time per micro-batch is the sum of its R virtual stages; a virtual stage costs its
blocks' forward + backward time, the embedding on the first virtual stage and the head + loss on
the last, plus the activation and its gradient crossing the link. `cost` minimises the slowest
device exactly (`split.min_max_split`); `memory` does the same subject to every device fitting
in memory; `profile` feeds the same optimiser with measured single-layer times.

Memory per device (`device_memory`): the step is one SPMD program, so every device allocates
what the fullest stage needs: R x J block slots (all stages padded to the largest, J layers) of
parameters, gradients and AdamW's two fp32 moments (16 bytes per fp32 parameter; `static_bytes`:
the moments and gradients split over `data` with ZeRO-1, and the block values too with FSDP,
which then holds one gathered copy for the step; a copy of the weights in a narrower compute
dtype); the embedding and head state, replicated over `pipe`; a stash as deep as the most micro-
batches any stage keeps in flight, each entry R x J layers' activations (only stage inputs, per
layer or per stage, under remat, split over `tensor`); the largest layer program's temporaries
(the head's forward and backward run back to back on one micro-batch); under remat stage, the
one virtual stage a backward replays; with the gradients split over `data`, one stage's gradient
whole as a backward forms it (`formed_gradient`); in a split table under remat, the recomputed
matmul inputs and output cotangents each B hands its W (in as many slots as the most pending on
any stage, `schedule.pending_weight_grads`).

How many micro-batches a stage holds at its peak, the bubble and the step time are read off the
table the executor runs (`schedule.executor_table`): the peak count of forwards awaiting their
backward, its idle share of cells, and its tick-synchronous simulation
(`simulate.simulate(lockstep=True)`) fed with each virtual stage's forward and backward time.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from jaxpipe import schedule
from jaxpipe.config import (
    ConfigError,
    ModelConfig,
    PipelineConfig,
    check_tensor_parallel,
)
from jaxpipe.costmodel import CostModel, outer_params
from jaxpipe.costs import DeviceProfile, get_profile, microbatch_size, model_costs
from jaxpipe.layout import StageLayout
from jaxpipe.measure import measure_layer_times
from jaxpipe.report import Plan, StageReport
from jaxpipe.simulate import simulate
from jaxpipe.split import min_max_split, spread, uniform_sizes

METHODS = ("uniform", "cost", "memory", "profile")


def static_bytes(pipe_cfg: PipelineConfig, blocks: bool = True, compute_bytes: float = 4) -> float:
    """Bytes per fp32 parameter held through a step: its value, its gradient and AdamW's two
    moments (16 when nothing is split over `data`). ZeRO-1 and FSDP split the moments over
    `data`, and with them the gradient: the compiler reduce-scatters each gradient as it
    accumulates, so a device holds only its part (as the TPU compiler's memory reports of the
    ZeRO-1 steps show: block and vocabulary gradients `[..., d / data, ...]`). FSDP splits block
    values (`blocks`) too, and holds one gathered copy for the step. With a narrower compute
    dtype (`compute_bytes` < 4) the compiler converts the weights once per step, not per tick:
    a copy in that dtype lives through the step, and with FSDP the gather moves (and keeps)
    that copy instead of the fp32 values.
    The forward + backward executor (every table but a ring with overlapped sends) accumulates
    the head's gradient in every stage and then sums it over `pipe`, so without a split over
    `data` the embedding and head parameters (not `blocks`) hold two gradients there."""
    D = pipe_cfg.data_parallel
    split = pipe_cfg.shard_moments
    moments = 8 / D if split else 8
    copy = compute_bytes if compute_bytes < 4 else 0
    if blocks and pipe_cfg.fsdp:
        value = 4 / D + (copy or 4) * (D > 1)
    else:
        value = 4 + copy
    on_ring = schedule.trains_on_ring(pipe_cfg.schedule, pipe_cfg.hop)
    two = not blocks and not on_ring and not split
    grads = 4 / D if split else 8 if two else 4
    return value + grads + moments


def _shape(pipe_cfg: PipelineConfig) -> tuple:
    p = pipe_cfg
    return p.schedule, p.num_stages, p.num_microbatches, p.num_repeats, p.hop


@functools.lru_cache(maxsize=256)
def _table(shape: tuple) -> schedule.ScheduleTable:
    return schedule.executor_table(*shape)


def step_table(pipe_cfg: PipelineConfig) -> schedule.ScheduleTable:
    """The forward + backward table the executor runs for this pipeline shape (built once per
    schedule, stages, micro-batches, repeats and hop)."""
    return _table(_shape(pipe_cfg))


@functools.lru_cache(maxsize=256)
def _peak_in_flight(shape: tuple) -> tuple[float, ...]:
    peak = schedule.in_flight(_table(shape)).max(axis=0)
    return tuple(float(n) / shape[3] for n in peak)


@functools.lru_cache(maxsize=256)
def _carry_slots(shape: tuple) -> int:
    """Slots every stage allocates for what B leaves for W: the peak over stages (SPMD)."""
    return int(schedule.pending_weight_grads(_table(shape)).max())


def in_flight(pipe_cfg: PipelineConfig, s: int) -> float:
    """Micro-batches' worth of activations stage s keeps alive at its peak: the most forwards
    of its virtual stages awaiting their backward in the executor's table, over R."""
    return _peak_in_flight(_shape(pipe_cfg))[s]


def head_stage(pipe_cfg: PipelineConfig) -> int:
    """The stage holding the last virtual stage (and so the head): S - 1, or 0 in a V."""
    S, R = pipe_cfg.num_stages, pipe_cfg.num_repeats
    return step_table(pipe_cfg).device_of(S * R - 1)[0]


def replay_bytes(cm: CostModel, pipe_cfg: PipelineConfig, slots: int) -> float:
    """Under remat stage a backward replays its whole virtual stage's forward first: every
    layer's saved activations of that micro-batch are alive at once, and with a kernel that
    materialises the attention scores, every layer's scores but the last's (which are among
    its own program's temporaries): the replayed forward and the backward are one region of
    the program, where the compiler keeps the scores rather than compute them twice (as the
    TPU compiler's memory reports of circular remat-stage steps show)."""
    if pipe_cfg.remat != "stage":
        return 0.0
    return slots * cm.block_act + (slots - 1) * cm.replay_scores


def weight_grad_carry(cm: CostModel, pipe_cfg: PipelineConfig, slots: int) -> float:
    """Bytes of what B leaves for W on every stage, counted for split tables under remat: B
    recomputes each layer's forward and hands W the matmul inputs and output cotangents
    (`backsplit`; measured per layer, `CostModel.block_carry`), in as many slots as the
    executor allocates. (Without remat B leaves output cotangents, which take the slots of the
    residuals it has just read, `stash.Stash`: not counted.)"""
    if pipe_cfg.remat == "none":
        return 0.0
    return _carry_slots(_shape(pipe_cfg)) * slots * cm.block_carry


def state_bytes(cm: CostModel, pipe_cfg: PipelineConfig, slots: int) -> float:
    """Bytes of model state every device holds through a step (`static_bytes`): R x `slots`
    block slots, and the embedding and head (replicated over `pipe`)."""
    blocks = static_bytes(pipe_cfg, compute_bytes=cm.compute_bytes)
    outer = static_bytes(pipe_cfg, blocks=False, compute_bytes=cm.compute_bytes)
    slot_params = pipe_cfg.num_repeats * slots * cm.block_params
    return blocks * slot_params + outer * (cm.embed_params + cm.head_params)


def device_memory(cm: CostModel, pipe_cfg: PipelineConfig, slots: int) -> float:
    """Bytes every device needs when each holds R x `slots` block slots.

    The step is one SPMD program, so every device allocates the buffers of the fullest stage,
    whatever its own layers (as the TPU compiler's memory reports show): R x `slots` slots of
    block state; the embedding and head state (replicated over `pipe`); a stash as deep as
    the most micro-batches any stage of the table holds in flight, each entry R x `slots`
    layers' saved activations (without remat), layer inputs (remat layer) or stage inputs
    (remat stage), split over `tensor`; the replay and W carries; with the gradients split
    over `data`, one stage's gradient as a backward forms it; the temporaries of the
    largest layer program (a block's or the head's forward + backward: every executor runs the
    head's backward right after its forward, one micro-batch at a time, so its activations
    never join the stash)."""
    R = pipe_cfg.num_repeats
    static = state_bytes(cm, pipe_cfg, slots)
    # Stashed layer or stage inputs: the compiler splits their buffers over `tensor` (their
    # last dim, as the TPU compiler's memory reports of the 1F1B and GPipe steps show).
    boundary = cm.boundary_bytes / pipe_cfg.tensor_parallel
    entry = {
        "none": R * slots * cm.block_act,
        "layer": R * slots * boundary,
        "stage": R * boundary,
    }[pipe_cfg.remat]
    depth = max(_peak_in_flight(_shape(pipe_cfg)))
    held = replay_bytes(cm, pipe_cfg, slots) + weight_grad_carry(cm, pipe_cfg, slots)
    return static + depth * entry + held + formed_gradient(cm, pipe_cfg, slots) + cm.temp_bytes


def formed_gradient(cm: CostModel, pipe_cfg: PipelineConfig, slots: int) -> float:
    """With the gradients split over `data` (ZeRO-1, FSDP), a backward still forms its stage's
    weight gradient whole, in the compute dtype, before the reduce-scatter takes this device's
    part (as the TPU compiler's memory reports show: a bfloat16 gradient of every slot beside
    the split fp32 one)."""
    if not pipe_cfg.shard_moments:
        return 0.0
    return pipe_cfg.num_repeats * slots * cm.block_params * cm.compute_bytes


def device_counts(
    cm: CostModel,
    pipe_cfg: PipelineConfig,
    num_layers: int,
    method: str,
    capacity: float | None = None,
    any_fit: bool = False,
    explain: bool = True,
) -> list[int]:
    """Layers per device (the sum of its R virtual stages) chosen by `method`.

    All blocks cost the same, so a device's time and memory depend only on how many blocks it
    holds; the split is optimal over those counts (exact for R > 1 too, where a device's layers
    are not contiguous). `capacity` (bytes) turns on the memory constraint; when nothing fits,
    the error names the stage count that would (unless `explain` is False: a search's quick no).
    """
    S, R = pipe_cfg.num_stages, pipe_cfg.num_repeats
    if method == "uniform":
        vsizes = uniform_sizes(num_layers, S * R)
        return [sum(c) for c in _by_device(vsizes, S, R, step_table(pipe_cfg).placement)]
    prefix = cm.block_time * np.arange(num_layers + 1)
    head = head_stage(pipe_cfg)

    def cost(p, starts, end):
        return prefix[end] - prefix[starts] + R * cm.transfer_time + cm.extra_time(p, S, head)

    if capacity is None:
        return min_max_split(num_layers, S, cost, min_size=R)[0]
    # Every device needs the memory of R x slots slots (`device_memory`), whatever its layers:
    # more slots allow a less even split, so the search widens them while they fit, keeping
    # the fewest that reach the best split.
    best = None
    for slots in range(math.ceil(num_layers / (S * R)), num_layers - S * R + 2):
        if device_memory(cm, pipe_cfg, slots) > capacity:
            break
        sizes, neck = min_max_split(num_layers, S, cost, R, R * slots)
        if best is None or neck < best[1] * (1 - 1e-9):
            best = (sizes, neck)
        if any_fit:
            break
    if best is None:
        if any_fit or not explain:
            raise ConfigError("does not fit")
        raise ConfigError(_no_fit_message(cm, pipe_cfg, num_layers, capacity))
    return best[0]


def _fits_somehow(cm, pipe_cfg, num_layers, capacity) -> bool:
    try:
        device_counts(cm, pipe_cfg, num_layers, "memory", capacity, any_fit=True)
        return True
    except ConfigError:
        return False


def _no_fit_message(cm: CostModel, pipe_cfg: PipelineConfig, num_layers: int, capacity: float):
    S = pipe_cfg.num_stages
    msg = (
        f"no partition of {num_layers} layers over {S} stages x {pipe_cfg.num_repeats} repeats "
        f"fits in {capacity / 2**30:.1f} GiB per device"
    )
    R = pipe_cfg.num_repeats
    if state_bytes(cm, pipe_cfg, 1) > capacity:
        outer = static_bytes(pipe_cfg, blocks=False, compute_bytes=cm.compute_bytes)
        outer *= cm.embed_params + cm.head_params
        return msg + (
            f": the embedding and head state alone (replicated over `pipe`) take "
            f"{outer / 2**30:.1f} GiB per device; split the vocabulary over more --tensor "
            "devices or the optimizer moments over --data_parallel with --zero1"
        )
    for more in range(S + 1, num_layers // R + 1):
        cfg = pipe_cfg.replace(num_stages=more)
        if _fits_somehow(cm, cfg, num_layers, capacity):
            return msg + f"; the smallest stage count that fits is {more} (--stages {more})"
    if pipe_cfg.remat == "none":
        return msg + "; no stage count fits either: try --remat layer or a smaller batch"
    return msg + "; no stage count fits either: use a smaller micro-batch or tensor parallelism"


def _by_device(vsizes: list[int], S: int, R: int, placement: str) -> list[list[int]]:
    v = lambda s, r: schedule.virtual_stage(placement, S, s, r)
    return [[vsizes[v(s, r)] for r in range(R)] for s in range(S)]


def virtual_counts(device_totals: list[int], R: int, placement: str = "loop") -> tuple[int, ...]:
    """Per-device totals -> per-virtual-stage counts (v held by repeat r of stage s as the
    schedule places it: `schedule.virtual_stage`), spread over repeats."""
    S = len(device_totals)
    per_device = [spread(n, R, heavy_first=s != 0) for s, n in enumerate(device_totals)]
    counts = [0] * (S * R)
    for s in range(S):
        for r in range(R):
            counts[schedule.virtual_stage(placement, S, s, r)] = per_device[s][r]
    return tuple(counts)


def make_plan(
    model_cfg: ModelConfig,
    pipe_cfg: PipelineConfig,
    method: str,
    *,
    batch_size: int,
    seq_len: int,
    device: str | DeviceProfile = "cpu",
    embed_in_first: bool = True,
    head_in_last: bool = True,
    compile_on=None,
) -> Plan:
    """Chooses each stage's layers; see the module docstring for the cost and memory model.

    Args:
      model_cfg, pipe_cfg: the model and pipeline shape (stages, micro-batches, repeats,
        schedule, remat, data / tensor parallel sizes).
      method: "uniform", "cost", "memory" or "profile" (measured layer times on this host's
        devices; the model must be small enough to allocate one block).
      batch_size, seq_len: the global batch and the sequence length.
      device: a profile name (see `costs.DEVICES`) or a `DeviceProfile`.
      embed_in_first / head_in_last: charge the embedding to the first stage and the head +
        loss to the last; when False they run outside the pipeline (added once per step).
      compile_on: the device layers are compiled for when costed (e.g. one compile-only chip
        of the target TPU, `topology.chip_device`: its compiler's memory figures, not the
        host's); default: the host.
    Returns:
      A `Plan` whose `.layout` is a `StageLayout` for `Pipeline.create`.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown partition method {method!r}; choose one of {METHODS}")
    pipe_cfg.check_layers(model_cfg.num_layers)
    check_tensor_parallel(model_cfg, pipe_cfg.tensor_parallel)  # the trainer's own check
    profile = get_profile(device, model_cfg, microbatch_size(pipe_cfg, batch_size), seq_len)
    costs = model_costs(
        model_cfg, pipe_cfg, batch_size=batch_size, seq_len=seq_len, device=compile_on
    )
    times = None
    if method == "profile":
        times = measure_layer_times(model_cfg, pipe_cfg, batch_size=batch_size, seq_len=seq_len)
    flags = dict(embed_in_first=embed_in_first, head_in_last=head_in_last)
    cm = CostModel.from_costs(costs, profile, model_cfg, pipe_cfg, times, **flags)
    capacity = profile.hbm_bytes if method == "memory" else None
    totals = device_counts(cm, pipe_cfg, model_cfg.num_layers, method, capacity)
    placement = step_table(pipe_cfg).placement
    if method == "uniform":
        counts = tuple(uniform_sizes(model_cfg.num_layers, pipe_cfg.num_virtual_stages))
    else:
        counts = virtual_counts(totals, pipe_cfg.num_repeats, placement)
    layout = StageLayout(pipe_cfg.num_stages, pipe_cfg.num_repeats, counts, placement)
    return build_plan(model_cfg, pipe_cfg, layout, cm, method, profile.name)


def replan(plan: Plan, cm: CostModel, method: str = "cost") -> Plan:
    """The same pipeline re-partitioned with another cost model (e.g. measured times)."""
    totals = device_counts(cm, plan.pipe_cfg, plan.model_cfg.num_layers, "cost")
    placement = plan.layout.placement
    layout = StageLayout(
        plan.pipe_cfg.num_stages,
        plan.pipe_cfg.num_repeats,
        virtual_counts(totals, plan.pipe_cfg.num_repeats, placement),
        placement,
    )
    return build_plan(plan.model_cfg, plan.pipe_cfg, layout, cm, method, plan.device)


def build_plan(
    model_cfg: ModelConfig,
    pipe_cfg: PipelineConfig,
    layout: StageLayout,
    cm: CostModel,
    method: str,
    device: str,
) -> Plan:
    """Predicted times, memory and parameters of every stage of `layout` under `cm`."""
    S, R, M = pipe_cfg.num_stages, pipe_cfg.num_repeats, pipe_cfg.num_microbatches
    counts = layout.layer_counts
    compute = np.array(
        [
            counts[v] * cm.block_time
            + (cm.embed_time if v == 0 and cm.embed_in_first else 0.0)
            + (cm.head_time if v == S * R - 1 and cm.head_in_last else 0.0)
            for v in range(S * R)
        ]
    )
    vtime = compute + cm.transfer_time
    v_SR, last = layout.v_SR, head_stage(pipe_cfg)
    memory = device_memory(cm, pipe_cfg, layout.slots)
    stages = []
    for s, ranges in enumerate(layout.stage_ranges()):
        layers = sum(b - a for a, b in ranges)
        params = layers * model_cfg.block_params() / pipe_cfg.tensor_parallel
        embed, head = outer_params(model_cfg, pipe_cfg.tensor_parallel, head_in_last=False)
        params += (s == 0 or not cm.embed_in_first) * embed
        params += (s == last or not cm.head_in_last) * head
        stages.append(
            StageReport(
                ranges=tuple(ranges),
                time_s=float(sum(vtime[v_SR[s, r]] for r in range(R))),
                memory_bytes=float(memory),
                params=int(round(params)),
                in_flight=in_flight(pipe_cfg, s),
            )
        )
    times = [st.time_s for st in stages]
    table = step_table(pipe_cfg)
    # A forward and a W take their shares of the compute, a backward (B) the rest; each op
    # sends half of the per-stage transfer.
    fwd = compute * cm.fwd_share
    wgt = compute * cm.wgt_share if table.split else np.zeros_like(compute)
    sim = simulate(
        table, fwd, compute - fwd - wgt, cm.transfer_time / 2, lockstep=True,
        concurrency=cm.concurrency, wgt_time=wgt,
    )
    outside = M * ((not cm.embed_in_first) * cm.embed_time + (not cm.head_in_last) * cm.head_time)
    grad_reduce = max(cm.grad_reduce_time(st.params) for st in stages)
    return Plan(
        model_cfg=model_cfg,
        pipe_cfg=pipe_cfg,
        layout=layout,
        method=method,
        device=device,
        stages=tuple(stages),
        vstage_times=tuple(float(t) for t in vtime),
        cost_model=cm,
        bottleneck_ratio=max(times) / (sum(times) / S),
        padding_bytes=layout.padding_slots * cm.block_params
        * static_bytes(pipe_cfg, compute_bytes=cm.compute_bytes),
        bubble_fraction=table.bubble_fraction(),
        step_time_s=sim.step_time + outside + grad_reduce,
        grad_reduce_s=grad_reduce,
    )
