"""Autotuner: the fastest way to train a model on a cluster, as the planner predicts it.

Searches `data x pipe x tensor` meshes (tensor inside a node and dividing the heads, kv heads and
MLP), every schedule with its repeats, the micro-batch count, remat, how the model state is split
over `data` (replicated, ZeRO-1, FSDP), where the embedding and head run, and the layer split
(`partition.device_counts`, method `cost`, then `memory` when the cost split overflows); drops
what does not fit in memory, and ranks the rest by the plan's predicted step time: the
executor's table simulated with per-stage costs and the communication of `costmodel.py`.

Layer costs are compiled twice per model (micro-batch 1 and 2, no tensor split) and scaled:
XLA's FLOP, byte and activation counts are linear in the micro-batch, and tensor parallelism
divides them (`costs.LayerCost.scaled`). remat "layer" and "stage" cost the same time, and the
state splits move the same gradient volume over `data` (`costmodel.py`), so each candidate takes
the first (remat, split) pair that fits, remat first in the order none, layer, stage (layer,
stage, none where the profile measured recomputing to be cheaper, `_remat_order`), then the
split in the order none, ZeRO-1, FSDP (a quick memory screen, `_memory_screen`, skips pairs that
cannot). With data = 1 there is nothing to split. The search is a branch and bound: every
candidate gets a lower bound of its step time (its work spread evenly over the stages, one link
time per tick, the fill and drain ticks, the gradient reduction of an even share of the
parameters), candidates are planned in order of that bound, and the search stops when the bound
reaches the k-th best plan's time: the top k are exact.

A measured CPU profile is first fitted to real training steps on the devices present
(`fit_executor`): the executor's per-micro-batch work and the optimizer are not in a profile
that times the model's blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import json
import math
import time

import jax

from jaxpipe.config import (
    REMAT_MODES,
    SCHEDULES,
    ConfigError,
    ModelConfig,
    PipelineConfig,
    check_tensor_parallel,
)
from jaxpipe.costmodel import CostModel, recompute_factor, tensor_factor
from jaxpipe.costs import (
    CALIBRATION_ELEMENTS,
    PROFILES,
    DeviceProfile,
    GiB,
    LayerCost,
    ModelCosts,
    StepFit,
    get_profiles,
    model_costs,
    runs_here,
)
from jaxpipe.flops import model_flops
from jaxpipe.layout import StageLayout
from jaxpipe.partition import (
    build_plan,
    device_counts,
    replay_bytes,
    state_bytes,
    static_bytes,
    step_table,
    virtual_counts,
)
from jaxpipe.report import Plan
from jaxpipe.schedule import SPLIT_SCHEDULES, stash_bound, table_cells
from jaxpipe.split import uniform_sizes
from jaxpipe.steptime import StepRun, measure_steps

REPEATS = (2, 3, 4, 6, 8)  # repeats tried by circular and interleaved_1f1b
# How the model state is split over `data`, cheapest first: PipelineConfig fields of each.
STATE_SPLITS = {
    "none": dict(zero1=False, fsdp=False),
    "zero1": dict(zero1=True, fsdp=False),
    "fsdp": dict(zero1=False, fsdp=True),
}
# Schedule tables above this many cells are not searched (about 1 s each to build).
MAX_SEARCH_CELLS = 200_000
# A memory-constrained split is tried when the cost split overflows by less than this factor
# (moving layers off the fullest device saves little more).
MEMORY_SPLIT_REACH = 1.25


@dataclasses.dataclass(frozen=True)
class Cluster:
    """num_devices of `device` (a profile name), in nodes of devices_per_node (None: the
    profile's own); memory_gib overrides the profile's memory per device."""

    num_devices: int
    device: str = "h100"
    devices_per_node: int | None = None
    memory_gib: float | None = None

    def __post_init__(self):
        if self.num_devices < 1:
            raise ConfigError(f"--devices must be >= 1, got {self.num_devices}")
        if self.devices_per_node is not None and self.devices_per_node < 1:
            raise ConfigError(
                f"--devices_per_node must be >= 1, got {self.devices_per_node}; or leave it out"
            )
        if self.memory_gib is not None and not self.memory_gib > 0:
            raise ConfigError(f"--memory_gib must be > 0, got {self.memory_gib}")

    def profile(self, model_cfg=None, microbatch=None, seq_len=None) -> DeviceProfile:
        return self.profiles(model_cfg, (microbatch,), seq_len)[microbatch]

    def profiles(self, model_cfg, microbatches, seq_len) -> dict[int, DeviceProfile]:
        """{micro-batch: this cluster's device profile at it} (a measured CPU measures the
        shapes together, so they compare)."""
        out = {}
        for b, p in get_profiles(self.device, model_cfg, microbatches, seq_len).items():
            p = p.with_devices_per_node(self.devices_per_node)
            if self.memory_gib is not None:
                p = dataclasses.replace(p, hbm_bytes=self.memory_gib * GiB)
            out[b] = p
        return out

    @property
    def node_size(self) -> int:
        if self.devices_per_node is not None:
            return self.devices_per_node
        profile = PROFILES.get(self.device)
        return self.num_devices if profile is None else profile.links.devices_per_node


class LayerCosts:
    """`ModelCosts` at any micro-batch and tensor degree from two compiles (see the module
    docstring)."""

    def __init__(self, c1: ModelCosts, c2: ModelCosts):
        """c1, c2: one device's costs at micro-batch 1 and 2, no tensor split."""
        self.c1, self.c2 = c1, c2
        self._cache: dict[tuple[int, int], ModelCosts] = {}

    @classmethod
    def compile(cls, model_cfg: ModelConfig, seq_len: int, compile_on=None) -> LayerCosts:
        one = PipelineConfig()
        c1, c2 = (
            model_costs(model_cfg, one, batch_size=b, seq_len=seq_len, device=compile_on)
            for b in (1, 2)
        )
        return cls(c1, c2)

    def at(self, b: int, tp: int) -> ModelCosts:
        if (b, tp) not in self._cache:

            def line(name):
                a, c = getattr(self.c1, name), getattr(self.c2, name)
                return LayerCost(*(getattr(a, f) + (b - 1) * (getattr(c, f) - getattr(a, f))
                                   for f in (f.name for f in dataclasses.fields(LayerCost))))

            self._cache[(b, tp)] = ModelCosts(
                line("block").scaled(tp), line("embed"), line("head").scaled(tp),
                self.c1.boundary_bytes * b, b, self.c1.seq_len, self.c1.w_share,
            )
        return self._cache[(b, tp)]


# The first columns of a table of candidates (`Candidate.columns`).
CANDIDATE_COLUMNS = (f"{'#':>2} {'DxPxT':>10} {'schedule':>16} {'R':>2} {'M':>4} {'remat':>5} "
                     f"{'state':>5} {'layout':>12}")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A fitting plan and what it predicts for the whole cluster."""

    plan: Plan
    global_batch: int
    seq_len: int
    tokens_per_s: float
    mfu: float
    memory_bytes: float  # the fullest device's
    bottleneck_stage: int

    @property
    def pipe_cfg(self) -> PipelineConfig:
        return self.plan.pipe_cfg

    def step_run(self) -> StepRun:
        """Its training step, as `steptime.measure_steps` times it."""
        return StepRun(self.plan.model_cfg, self.pipe_cfg, self.plan.layout, self.global_batch,
                       self.seq_len)

    def columns(self, rank: int) -> str:
        """Its first columns in a table of candidates (`CANDIDATE_COLUMNS`)."""
        p = self.pipe_cfg
        return (f"{rank:>2} {self.mesh():>10} {p.schedule:>16} {p.num_repeats:>2} "
                f"{p.num_microbatches:>4} {p.remat:>5} {self.state_split:>5} {self.layout():>12}")

    def mesh(self) -> str:
        p = self.pipe_cfg
        return f"{p.data_parallel}x{p.num_stages}x{p.tensor_parallel}"

    @property
    def state_split(self) -> str:
        return state_split(self.pipe_cfg)

    def layout(self) -> str:
        """Where embedding and head run, and the fewest-most layers a device holds."""
        n = [st.num_layers for st in self.plan.stages]
        spread = f"{min(n)}" if min(n) == max(n) else f"{min(n)}-{max(n)}"
        return f"{self.pipe_cfg.embed_head} {spread}"

    def flags(self, device: str) -> str:
        """The train_lm.py command that runs this candidate."""
        p = self.pipe_cfg
        return (
            f"python experiments/train_lm.py --model {self.plan.model_cfg.name} "
            f"--data_parallel {p.data_parallel} --num_stages {p.num_stages} "
            f"--tensor_parallel {p.tensor_parallel} --schedule {p.schedule} "
            f"--num_repeats {p.num_repeats} --num_microbatches {p.num_microbatches} "
            f"--remat {p.remat} --embed_head {p.embed_head} --batch_size {self.global_batch} "
            f"--seq_len {self.seq_len} --partition {self.plan.method} --device_profile {device}"
            + ("" if self.state_split == "none" else f" --{self.state_split}")
            + ("" if self.plan.model_cfg.attention == "xla"
               else f" --attention {self.plan.model_cfg.attention}")
        )

    def to_dict(self) -> dict:
        p = self.pipe_cfg
        return {
            "mesh": {"data": p.data_parallel, "pipe": p.num_stages, "tensor": p.tensor_parallel},
            "schedule": p.schedule,
            "num_repeats": p.num_repeats,
            "num_microbatches": p.num_microbatches,
            "microbatch_size": self.global_batch // (p.num_microbatches * p.data_parallel),
            "remat": p.remat,
            "state_split": self.state_split,
            "embed_head": p.embed_head,
            "layer_counts": list(self.plan.layout.layer_counts),
            "step_time_s": self.plan.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "bubble_fraction": self.plan.bubble_fraction,
            "memory_bytes": self.memory_bytes,
            "bottleneck_stage": self.bottleneck_stage,
            "grad_reduce_s": self.plan.grad_reduce_s,
        }


def state_split(pipe_cfg: PipelineConfig) -> str:
    """The `STATE_SPLITS` name of a pipeline config's ZeRO-1 / FSDP fields."""
    return "fsdp" if pipe_cfg.fsdp else "zero1" if pipe_cfg.zero1 else "none"


def searched_splits(zero1: bool = False, fsdp: bool = False) -> tuple[str, ...]:
    """The state splits to search: the one a user asked for (ZeRO-1 or FSDP), else all."""
    asked = state_split(PipelineConfig(zero1=zero1, fsdp=fsdp))
    return tuple(STATE_SPLITS) if asked == "none" else (asked,)


def candidate(plan: Plan, global_batch: int, seq_len: int, profile: DeviceProfile) -> Candidate:
    step = plan.step_time_s
    n = plan.pipe_cfg.num_devices
    times = plan.stage_times
    return Candidate(
        plan=plan,
        global_batch=global_batch,
        seq_len=seq_len,
        tokens_per_s=global_batch * seq_len / step,
        mfu=model_flops(plan.model_cfg, global_batch, seq_len) / (step * n * profile.peak_flops),
        memory_bytes=max(st.memory_bytes for st in plan.stages),
        bottleneck_stage=times.index(max(times)),
    )


def plan_for(
    model_cfg: ModelConfig,
    pipe_cfg: PipelineConfig,
    costs: ModelCosts,
    profile: DeviceProfile,
    method: str = "cost",
    fit: bool = True,
) -> Plan | None:
    """The plan of one configuration with `method`'s split ("cost", falling back to "memory"
    when it overflows, or "uniform"), or None when it does not fit in the profile's memory
    (unless `fit` is False: then the plan whatever its memory)."""
    inside = pipe_cfg.embed_head == "inside"
    cm = CostModel.from_costs(
        costs, profile, model_cfg, pipe_cfg, embed_in_first=inside, head_in_last=inside
    )
    L, S, R = model_cfg.num_layers, pipe_cfg.num_stages, pipe_cfg.num_repeats
    capacity = profile.hbm_bytes
    placement = step_table(pipe_cfg).placement  # the table the plan simulates, built once
    if method == "uniform":
        counts = tuple(uniform_sizes(L, S * R))
    else:
        totals = _cost_counts(cm, pipe_cfg.replace(zero1=False, fsdp=False), L)
        counts = virtual_counts(totals, R, placement)
    layout = StageLayout(S, R, counts, placement)
    plan = build_plan(model_cfg, pipe_cfg, layout, cm, method, profile.name)
    memory = max(st.memory_bytes for st in plan.stages)
    if memory <= capacity or not fit:
        return plan
    if method == "uniform" or memory > MEMORY_SPLIT_REACH * capacity:
        return None
    try:
        totals = device_counts(cm, pipe_cfg, L, "memory", capacity, explain=False)
    except ConfigError:
        return None
    layout = StageLayout(S, R, virtual_counts(totals, R, placement), placement)
    return build_plan(model_cfg, pipe_cfg, layout, cm, "memory", profile.name)


@dataclasses.dataclass(frozen=True)
class ExecutorFit:
    """A profile fitted to the executor's measured training steps (`fit_executor`)."""

    runs: tuple[str, ...]  # the reference configurations
    predicted_s: tuple[float, ...]  # their steps as the profile predicted them before the fit
    measured_s: tuple[float, ...]
    efficiency: float = 1.0  # what the fit multiplies the profile's compute rates by,
    concurrency_scale: float = 1.0  # ... its concurrency by (devices sharing cores),
    remat_scale: float = 1.0  # ... its recompute cost on one stage (`remat_cost`) by,
    devices: int = 1  # what the fit adds (`StepFit`, with more than one stage): the devices
    stages: int = 1  # and stages of the references,
    staged_remat_scale: float = 1.0  # the recompute cost on `stages` stages over the profile's,
    split_remat_scale: float = 1.0  # ... and in split tables,
    alone_remat_scale: float | None = None  # ... and with one stage busy at a time (M = 1),
    split_cost: float = 1.0  # a block's time in split tables over fused (`StepFit.split_cost`),
    # what the recompute scales multiply: the one-stage cost the profile measured at the
    # all-`data` references' micro-batch, for every micro-batch (None: each profile's own)
    remat_base: float | None = None
    data_concurrency_scale: float = 1.0  # the concurrency with all devices on `data` over it
    tensor: int = 1  # the tensor ranks of the references on `tensor` (1: none ran),
    tensor_scale: float = 1.0  # a block's time there over the model's (`StepFit.tensor_cost`),
    tensor_remat_scale: float = 1.0  # ... and under remat, relative to that (`remat_tensor`)

    def apply(self, profiles: dict) -> dict:
        """{micro-batch: profile} fitted."""
        return {b: self.fitted(p) for b, p in profiles.items()}

    def fitted(self, profile: DeviceProfile) -> DeviceProfile:
        # The recompute costs are fitted ratios of whole steps, the same at every micro-batch:
        # a profile's own figure per micro-batch varies more between calibrations than between
        # micro-batches (`small` on 8 forced devices: 0.84-1.05 at micro-batch 1-16).
        measured = self.remat_base
        if measured is None:
            measured = recompute_factor(profile, "layer")  # the profile's own, on one stage
        shared = None if profile.concurrency is None else (
            profile.concurrency * self.concurrency_scale
        )
        step_fit = None
        if self.stages > 1:
            step_fit = StepFit(
                self.devices, self.stages, measured * self.staged_remat_scale,
                measured * self.split_remat_scale,
                None if shared is None else shared * self.data_concurrency_scale,
                None if self.alone_remat_scale is None else measured * self.alone_remat_scale,
                self.split_cost, self.tensor, self.tensor_scale, self.tensor_remat_scale,
            )
        return dataclasses.replace(
            profile, flops_efficiency=profile.flops_efficiency * self.efficiency,
            concurrency=shared, remat_cost=measured * self.remat_scale, fit=step_fit,
        )

    def describe(self) -> str:
        steps = ", ".join(f"{r} {p:.3f} -> {m:.3f} s" for r, p, m in
                          zip(self.runs, self.predicted_s, self.measured_s, strict=True))
        data = staged = ""
        if self.stages > 1:  # what the fit adds by the mesh's split
            data = (f" (x{self.data_concurrency_scale:.2f} more all on data), split tables' "
                    f"blocks x{self.split_cost:.2f}")
            alone = ("" if self.alone_remat_scale is None
                     else f", x{self.alone_remat_scale:.2f} one stage busy")
            staged = (f", x{self.staged_remat_scale:.2f} on {self.stages} "
                      f"(x{self.split_remat_scale:.2f} in split tables{alone})")
            if self.tensor > 1:
                staged += (f"; blocks on {self.tensor} tensor ranks x{self.tensor_scale:.2f}, "
                           f"x{self.tensor_remat_scale:.2f} more under remat")
        return (
            f"fitted to measured steps (predicted -> measured: {steps}): compute rate "
            f"x{self.efficiency:.2f}, concurrency x{self.concurrency_scale:.2f}{data}, "
            f"recompute cost x{self.remat_scale:.2f} on one stage{staged}"
        )


def steps_run_here(model_cfg: ModelConfig, global_batch: int, seq_len: int) -> bool:
    """Whether `fit_executor`'s reference steps can run on this host: the profile measures the
    model's own layers at the global batch, and the whole model has at most
    `CALIBRATION_ELEMENTS` parameters (a larger one is planned with the profile as measured)."""
    return (model_cfg.num_params() <= CALIBRATION_ELEMENTS
            and runs_here(model_cfg, global_batch, seq_len))


# Rounds of a fit: each moves a factor by the ratio of predicted to measured step; a step's
# time is nearly linear in each.
FIT_ROUNDS = 6


def fit_executor(model_cfg: ModelConfig, costs: LayerCosts, profiles: dict, num_devices: int,
                 global_batch: int, seq_len: int, reps: int = 5, tensor: int = 1) -> ExecutorFit:
    """Fits a measured profile to the executor's own steps. A profile times the model's blocks
    alone, while a training step also runs the executor's per-micro-batch work (copies and
    slices of the stacked residuals, each micro-batch's weight-gradient matmuls) and the
    optimizer, and on a shared host all devices at once, where recomputing a block can cost
    less than storing its residuals. Up to ten reference configurations on the devices present (up
    to `num_devices`, n), GPipe unless said, each at the searched micro-batch nearest its share
    of the global batch, run their real training steps (`steptime.measure_steps`):
      "alone"     all devices on `pipe` (S of them: as many as there are layers, the rest on
                  `data`), M = 1: one stage busy at a time; fits the compute rate;
      "together"  the same at M = 2S: every stage busy in the steady state; fits the
                  concurrency (how many devices sharing the host's cores run at full speed);
      "together, recomputed"  the same with remat "layer": with "together", fits the
                  recompute cost on S stages;
      "alone, recomputed"  "alone" with remat "layer": with "alone", fits the recompute cost
                  with one stage busy at a time (it gains least there);
      "split", "split, recomputed"  the same two with zb_h1: the first fits what a block
                  costs in a split table over fused backward ops (B writes the output
                  cotangents W reads back), the pair the recompute cost in split tables (B
                  recomputes the forward and still hands W the matmul inputs);
      "kept", "recomputed"  all devices on `data`, M = 2, without and with remat "layer":
                  the first fits the concurrency with every device on `data`, running the whole
                  model at once (`costmodel.concurrency`), the two the recompute cost on one
                  stage;
      "tensor", "tensor, recomputed"  the devices on `tensor` (t: the largest searched degree,
                  `tensor`, that divides n) and `data`, one stage, M = 2t (the all-`data`
                  pair's micro-batch), without and with remat "layer": the first fits a
                  tensor-parallel block's time over the model's figure, the pair what remat
                  gains there over the model's figure (`costmodel.tensor_factor`; on 8 forced
                  CPU devices, `small`, data 2 x tensor 4 stepped 0.95x its prediction without
                  remat and 0.78x with, where all on `data` stepped 0.98x and 0.94x).
    The recompute costs are scales of one base (the profile's own figure at the all-`data`
    references' micro-batch), so every micro-batch takes the same fitted figures.
    The rate and concurrency factors are refitted in turn, each `FIT_ROUNDS` times (the
    other parts of a step do not scale with them). Each recompute cost is fitted on a ratio of
    two steps, so that the error of the rest stays out of it, and the planner interpolates
    between one stage and S (`costmodel.recompute_factor`): on a shared host recomputing gains
    the most where every device runs the whole model at once, and the least in split tables
    (`small` on 4 forced devices, one run, remat "layer" over none: 4 x 1 x 1 gpipe at M = 2
    0.76, 2 x 2 x 1 at M = 4 0.79, 1 x 4 x 1 at M = 8 0.95, at M = 1 1.08, zb_h1 at M = 4
    1.10). With one
    stage (one device, or one layer) only "alone", "together" and the all-`data` pair run, and
    nothing is fitted by the mesh's split; with t = 1 the tensor pair does not run.
    """
    n = max(1, min(num_devices, jax.device_count()))
    S = max(s for s in _divisors(n) if s <= model_cfg.num_layers)
    together = PipelineConfig(S, 2 * S, 1, "gpipe", "none", data_parallel=n // S)
    pipes = {
        "alone": together.replace(num_microbatches=1),
        "together": together,
        "kept": PipelineConfig(1, 2, 1, "gpipe", "none", data_parallel=n),
        "recomputed": PipelineConfig(1, 2, 1, "gpipe", "layer", data_parallel=n),
    }
    pairs = [("kept", "recomputed", "remat_scale")]
    # (reference, field): a block's cost there over the model's figure, fitted to its step
    blocks = []
    if S > 1:
        pipes.update({
            "alone, recomputed": together.replace(num_microbatches=1, remat="layer"),
            "together, recomputed": together.replace(remat="layer"),
            "split": together.replace(schedule="zb_h1"),
            "split, recomputed": together.replace(schedule="zb_h1", remat="layer"),
        })
        pairs += [("alone", "alone, recomputed", "alone_remat_scale"),
                  ("together", "together, recomputed", "staged_remat_scale"),
                  ("split", "split, recomputed", "split_remat_scale")]
        blocks.append(("split", "split_cost"))  # a split table's blocks over fused ones
    t = math.gcd(n, tensor) if S > 1 else 1
    if t > 1:
        ranks = PipelineConfig(1, 2 * t, 1, "gpipe", "none", data_parallel=n // t,
                               tensor_parallel=t)
        pipes.update({"tensor": ranks, "tensor, recomputed": ranks.replace(remat="layer")})
        pairs.append(("tensor", "tensor, recomputed", "tensor_remat_scale"))
        blocks.append(("tensor", "tensor_scale"))
    shape = {}  # the searched micro-batch nearest each reference's share of the global batch
    for name, p in pipes.items():
        share = global_batch / (p.num_microbatches * p.data_parallel)
        shape[name] = min(profiles, key=lambda b: (abs(b - share), b))

    def plan(name: str, profile: DeviceProfile) -> Plan:
        b = shape[name]
        p = pipes[name]
        return plan_for(model_cfg, p, costs.at(b, p.tensor_parallel), profile, fit=False)

    def predict(name: str, fit: ExecutorFit) -> float:
        return plan(name, fit.fitted(profiles[shape[name]])).step_time_s

    before = {name: plan(name, profiles[shape[name]]) for name in pipes}
    runs = [
        StepRun(model_cfg, p, before[name].layout,
                shape[name] * p.num_microbatches * p.data_parallel, seq_len)
        for name, p in pipes.items()
    ]
    keys = [(r.pipe_cfg, r.global_batch) for r in runs]  # on one device some are the same
    unique = dict(zip(keys, runs, strict=True))
    times = dict(zip(unique, measure_steps(list(unique.values()), reps), strict=True))
    measured = {name: times[key] for name, key in zip(pipes, keys, strict=True)}
    labels = tuple(f"{p.data_parallel}x{p.num_stages}x{p.tensor_parallel} {p.schedule} "
                   f"M={p.num_microbatches} remat {p.remat}" for p in pipes.values())
    fit = ExecutorFit(labels, tuple(before[name].step_time_s for name in pipes),
                      tuple(measured.values()), devices=n, stages=S, tensor=t,
                      remat_base=recompute_factor(profiles[shape["kept"]], "layer"))
    shared = profiles[shape["together"]].concurrency
    most = n / shared if n > 1 and shared else None  # n devices at full speed at most
    for _ in range(FIT_ROUNDS):
        scale = predict("alone", fit) / measured["alone"]
        fit = dataclasses.replace(fit, efficiency=fit.efficiency * scale)
        if most is None:
            continue
        scale = fit.concurrency_scale * predict("together", fit) / measured["together"]
        fit = dataclasses.replace(fit, concurrency_scale=min(scale, most))
        if S > 1:
            scale = fit.data_concurrency_scale * predict("kept", fit) / measured["kept"]
            fit = dataclasses.replace(
                fit, data_concurrency_scale=min(scale, most / fit.concurrency_scale)
            )
    for name, field in blocks:
        for _ in range(FIT_ROUNDS):
            scale = measured[name] / predict(name, fit)
            fit = dataclasses.replace(fit, **{field: getattr(fit, field) * scale})
    for kept, recomputed, field in pairs:
        ratio = measured[recomputed] / measured[kept]
        if getattr(fit, field) is None:  # not fitted until now: the profile's own to start
            fit = dataclasses.replace(fit, **{field: 1.0})
        for _ in range(FIT_ROUNDS):
            scale = ratio / (predict(recomputed, fit) / predict(kept, fit))
            fit = dataclasses.replace(fit, **{field: getattr(fit, field) * scale})
    return fit


@functools.lru_cache(maxsize=4096)
def _cost_counts(cm: CostModel, pipe_cfg: PipelineConfig, L: int) -> tuple[int, ...]:
    """The `cost` split's layers per device: times only, so the same for every state split
    (the search plans a configuration again with the next split when one does not fit)."""
    return tuple(device_counts(cm, pipe_cfg, L, "cost"))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _tensor_degrees(model_cfg: ModelConfig, cluster: Cluster) -> list[int]:
    out = []
    for t in _divisors(math.gcd(cluster.num_devices, cluster.node_size)):
        try:
            check_tensor_parallel(model_cfg, t)
            out.append(t)
        except ConfigError:
            pass
    return out


def _shapes(model_cfg: ModelConfig, S: int, M: int, schedules) -> list[tuple[str, int]]:
    """(schedule, repeats) pairs the executors accept for S stages and M micro-batches."""
    if S == 1:
        return [("gpipe", 1)]  # one stage: every schedule runs the same ops
    out = []
    for sched in schedules:
        reps = {"gpipe": (1,), "1f1b": (1,), "zb_h1": (1,), "zbv": (2,)}.get(sched, REPEATS)
        for R in reps:
            if S * R > model_cfg.num_layers:
                continue
            if sched == "interleaved_1f1b" and M % S:
                continue
            ring = sched in ("gpipe", "circular")
            if table_cells(S, M, R, ring, split=sched in SPLIT_SCHEDULES) > MAX_SEARCH_CELLS:
                continue
            out.append((sched, R))
    return out


def _lower_bound(cm: CostModel, pipe_cfg: PipelineConfig, model_cfg: ModelConfig) -> float:
    """A step time no plan of this configuration beats (module docstring)."""
    S, R, M = pipe_cfg.num_stages, pipe_cfg.num_repeats, pipe_cfg.num_microbatches
    inside = cm.embed_time * cm.embed_in_first + cm.head_time * cm.head_in_last
    work = model_cfg.num_layers * cm.block_time + inside
    parallel = S if cm.concurrency is None else min(S, cm.concurrency)
    # Zero-bubble schedules fill the fill and drain with W ops: no idle time to count.
    fill = 0.0 if pipe_cfg.schedule in SPLIT_SCHEDULES else 2 * (S - 1) * cm.block_time / 3
    outside = M * (cm.embed_time * (not cm.embed_in_first) + cm.head_time * (not cm.head_in_last))
    params = model_cfg.num_layers * cm.block_params + cm.embed_params + cm.head_params
    grads = cm.grad_reduce_time(params / S)
    return M * work / parallel + M * R * cm.transfer_time + fill + outside + grads


def _may_fit(costs: ModelCosts, profile: DeviceProfile, model_cfg: ModelConfig,
             pipe_cfg: PipelineConfig) -> CostModel | None:
    """The configuration's cost model, or None when the memory screen rules it out."""
    inside = pipe_cfg.embed_head == "inside"
    cm = CostModel.from_costs(costs, profile, model_cfg, pipe_cfg, embed_in_first=inside,
                              head_in_last=inside)
    screen = _memory_screen(cm, pipe_cfg, model_cfg.num_layers)
    return cm if screen <= MEMORY_SPLIT_REACH * profile.hbm_bytes else None


def _memory_screen(cm: CostModel, pipe_cfg: PipelineConfig, L: int) -> float:
    """About the least memory a device needs (no table built): the parameter state of the
    fewest slots that hold L layers and of the embedding and head, plus, under remat stage,
    the activations of one virtual stage (a backward replays its forward first), without
    remat, the activations of the most micro-batches a stage holds in flight
    (`schedule.stash_bound`, the bound every table is validated against, in whole stages: over
    R) over an even share of the layers."""
    S, R, M = pipe_cfg.num_stages, pipe_cfg.num_repeats, pipe_cfg.num_microbatches
    slots = math.ceil(L / (S * R))
    static = state_bytes(cm, pipe_cfg, slots) + cm.temp_bytes + replay_bytes(cm, pipe_cfg, slots)
    if pipe_cfg.remat != "none":
        return static
    held = stash_bound(pipe_cfg.schedule, S, M, R) / R
    return static + held * (L // S) * cm.block_act


@dataclasses.dataclass(frozen=True)
class AutotuneResult:
    model_cfg: ModelConfig
    cluster: Cluster
    global_batch: int
    seq_len: int
    candidates: tuple[Candidate, ...]  # best first
    searched: int  # configurations enumerated
    planned: int  # configurations planned exactly
    elapsed_s: float
    profiles: dict = dataclasses.field(default_factory=dict)  # micro-batch -> profile searched
    fit: ExecutorFit | None = None  # how a measured CPU profile was fitted to real steps
    costed_on: str = "cpu"  # what the layers were compiled for (`search`'s compile_on)

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def table(self) -> str:
        c = self.cluster
        rows = [
            f"autotune: {self.model_cfg.name} on {c.num_devices} x {c.device} "
            f"({c.node_size} per node), global batch {self.global_batch} x {self.seq_len} "
            f"tokens; {self.searched} configurations, {self.planned} planned, "
            f"{self.elapsed_s:.1f} s; attention {self.model_cfg.attention}, layers compiled for "
            f"{self.costed_on}",
            f"{CANDIDATE_COLUMNS} {'step s':>8} {'tok/s':>10} {'MFU':>6} {'bubble':>6} "
            f"{'mem GiB':>8} {'neck':>4}",
        ]
        if self.fit is not None:
            rows.insert(1, self.fit.describe())
        for i, k in enumerate(self.candidates):
            rows.append(
                f"{k.columns(i + 1)} {k.plan.step_time_s:>8.3f} {k.tokens_per_s:>10,.0f} "
                f"{k.mfu:>6.1%} {k.plan.bubble_fraction:>6.1%} {k.memory_bytes / GiB:>8.1f} "
                f"{k.bottleneck_stage:>4}"
            )
        rows.append("best: " + self.best.flags(c.device))
        return "\n".join(rows)

    def to_dict(self) -> dict:
        c = self.cluster
        return {
            "model": self.model_cfg.name,
            "devices": c.num_devices,
            "device": c.device,
            "devices_per_node": c.node_size,
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
            "searched": self.searched,
            "planned": self.planned,
            "elapsed_s": self.elapsed_s,
            "attention": self.model_cfg.attention,
            "costed_on": self.costed_on,
            "candidates": [k.to_dict() for k in self.candidates],
            "best_command": self.best.flags(c.device),
            "executor_fit": None if self.fit is None else dataclasses.asdict(self.fit),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def search(
    model_cfg: ModelConfig,
    cluster: Cluster,
    *,
    global_batch: int,
    seq_len: int,
    top: int = 10,
    schedules: tuple[str, ...] = SCHEDULES,
    remats: tuple[str, ...] = REMAT_MODES,
    splits: tuple[str, ...] = tuple(STATE_SPLITS),
    embed_heads: tuple[str, ...] = ("inside", "outside"),
    max_microbatch: int | None = None,
    layer_costs: LayerCosts | None = None,
    compile_on=None,
    fit_steps: bool | None = None,
) -> AutotuneResult:
    """The `top` fastest fitting configurations (module docstring); raises a ConfigError naming
    what would fit when none does. compile_on: the device the layers are compiled for when
    costed (a compile-only TPU chip, `topology.costing_target`; None: JAX's default device).
    fit_steps: fit the profile to measured training steps first (`fit_executor`); None: for a
    measured CPU profile (device "cpu") when the model trains on this host (`steps_run_here`)."""
    t0 = time.perf_counter()
    if global_batch < 1 or seq_len < 1 or top < 1:
        raise ConfigError(
            f"global batch, seq_len and --top must be >= 1, got {global_batch}, {seq_len}, {top}"
        )
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"seq_len {seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}"
        )
    unknown = sorted(set(splits) - set(STATE_SPLITS))
    if unknown or not splits:
        raise ConfigError(f"state splits must be among {', '.join(STATE_SPLITS)}, got {splits}")
    costs = layer_costs or LayerCosts.compile(model_cfg, seq_len, compile_on)
    L, N = model_cfg.num_layers, cluster.num_devices
    shapes = [b for b in _divisors(global_batch) if max_microbatch is None or b <= max_microbatch]
    profiles = cluster.profiles(model_cfg, shapes, seq_len)
    if fit_steps is None:
        fit_steps = cluster.device == "cpu" and steps_run_here(model_cfg, global_batch, seq_len)
    fit = None
    degrees = _tensor_degrees(model_cfg, cluster)
    if fit_steps:
        fit = fit_executor(model_cfg, costs, profiles, cluster.num_devices, global_batch, seq_len,
                           tensor=max(degrees))
        profiles = fit.apply(profiles)
    groups = []  # (lower bound, index, pipe config, costs, profile)
    searched = 0
    for t in degrees:
        for S in _divisors(N // t):
            D = N // (t * S)
            if S > L or global_batch % D:
                continue
            per_replica = global_batch // D
            for b in shapes:
                if per_replica % b:
                    continue
                M = per_replica // b
                c = costs.at(b, t)
                profile = profiles[b]
                for sched, R in _shapes(model_cfg, S, M, schedules):
                    # (remat, split) pairs in the order they are tried; with data 1 nothing
                    # splits.
                    order = _remat_order(remats, profile, S, sched in SPLIT_SCHEDULES, M, t)
                    pairs = [(r, sp) for r in order for sp in (splits if D > 1 else ("none",))]
                    for eh in embed_heads:
                        searched += len(pairs)
                        for j, (remat, sp) in enumerate(pairs):  # the first that may fit
                            pcfg = PipelineConfig(S, M, R, sched, remat, data_parallel=D,
                                                  tensor_parallel=t, embed_head=eh,
                                                  **STATE_SPLITS[sp])
                            cm = _may_fit(c, profile, model_cfg, pcfg)
                            if cm is not None:
                                lb = _lower_bound(cm, pcfg, model_cfg)
                                groups.append((lb, len(groups), pcfg, c, profile, pairs[j:]))
                                break
    groups.sort(key=lambda g: g[:2])
    best: list[tuple[float, int, Candidate]] = []  # max-heap on step time (negated)
    planned = 0
    for lb, i, pcfg, c, profile, rest in groups:
        if len(best) >= top and lb >= -best[0][0]:
            break
        for j, (remat, sp) in enumerate(rest):
            pcfg_j = pcfg.replace(remat=remat, **STATE_SPLITS[sp])
            if j and _may_fit(c, profile, model_cfg, pcfg_j) is None:
                continue
            planned += 1
            plan = plan_for(model_cfg, pcfg_j, c, profile)
            if plan is None:
                continue
            k = candidate(plan, global_batch, seq_len, profile)
            heapq.heappush(best, (-plan.step_time_s, -i, k))
            if len(best) > top:
                heapq.heappop(best)
            break
    if not best:
        raise ConfigError(_nothing_fits(model_cfg, cluster, global_batch, seq_len, costs, remats))
    ranked = tuple(k for _, _, k in sorted(best, key=lambda e: (-e[0], -e[1])))
    costed_on = jax.default_backend() if compile_on is None else compile_on.device_kind
    return AutotuneResult(model_cfg, cluster, global_batch, seq_len, ranked, searched, planned,
                          time.perf_counter() - t0, profiles, fit, costed_on)


def _remat_order(
    remats: tuple[str, ...], profile: DeviceProfile, stages: int, split: bool,
    microbatches: int | None = None, tensor: int = 1,
) -> list[str]:
    """Remat modes cheapest first on `stages` stages, in a split table or not, with
    `microbatches` (None: at least `stages`) and `tensor` ranks: no remat, unless the profile
    measured recomputing a block to cost less than keeping its residuals (a CPU can)."""
    busy = None if microbatches is None else min(microbatches, stages)
    return sorted(remats, key=lambda r: recompute_factor(profile, r, stages, split, busy)
                  * tensor_factor(profile, tensor, r, stages))


def _nothing_fits(model_cfg, cluster, global_batch, seq_len, costs, remats) -> str:
    """What would fit: the devices the model's static bytes need, remat, a smaller batch."""
    profile = cluster.profile(model_cfg, 1, seq_len)
    capacity = profile.hbm_bytes
    state = model_cfg.num_params() * static_bytes(PipelineConfig())
    need = math.ceil(state / capacity)
    msg = (
        f"no configuration of {model_cfg.name} fits {cluster.num_devices} x {cluster.device} "
        f"({capacity / GiB:.1f} GiB each) at global batch {global_batch} x {seq_len} tokens"
    )
    if need > cluster.num_devices:
        return msg + (
            f": its parameters, gradients and AdamW moments alone take {state / GiB:,.0f} GiB, "
            f"so it needs at least {need} devices (try --devices {_pow2_at_least(need)}), or "
            f"devices with more memory (--memory_gib)"
        )
    hint = "" if "layer" in remats else "; allow remat (layer or stage)"
    return msg + (
        f": the model state fits {need} device(s), the activations do not{hint}; try a smaller "
        f"--global_batch or --seq_len, or more devices (--devices {2 * cluster.num_devices})"
    )


def _pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


def choose(
    model_cfg: ModelConfig,
    base: PipelineConfig,
    *,
    num_devices: int,
    device: str,
    global_batch: int,
    seq_len: int,
    devices_per_node: int | None = None,
) -> AutotuneResult:
    """The search for a training run on `num_devices` present devices; every candidate keeps
    `base`'s choices that the search does not make (boundary dtype). A state split that `base`
    asks for (ZeRO-1 or FSDP) is the only one searched."""
    cluster = Cluster(num_devices, device, devices_per_node)
    found = search(model_cfg, cluster, global_batch=global_batch, seq_len=seq_len, top=5,
                   splits=searched_splits(base.zero1, base.fsdp))
    keep = dict(boundary_dtype=base.boundary_dtype)

    def keeping(k: Candidate) -> Candidate:
        if all(getattr(k.pipe_cfg, f) == v for f, v in keep.items()):
            return k
        return dataclasses.replace(
            k, plan=dataclasses.replace(k.plan, pipe_cfg=k.pipe_cfg.replace(**keep)))

    return dataclasses.replace(found, candidates=tuple(keeping(k) for k in found.candidates))
