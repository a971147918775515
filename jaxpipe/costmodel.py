"""The planner's cost model: per-layer seconds and bytes of one micro-batch on one device.

Compute is the roofline of each layer's XLA costs on the device profile; under remat the
blocks' forward runs twice (the backward recomputes it), so a block costs 4/3 of its forward +
backward (or what the profile measured, `DeviceProfile.remat_cost`, on one stage and on
several, `recompute_factor`; on a shared host, how many devices run at once with the mesh's
split, `concurrency`, and what a split table's B and W cost over the fused backward,
`split_factor`). Communication
(`links.py`), on the `data x pipe x tensor` mesh:

- tensor: Megatron-style all-reduces of one activation [b, T, D] per block: two in the forward,
  two in the backward, and those of the replayed forward under remat that the backward reads
  (`tensor_all_reduces`: one more under remat "layer", where the block's output is saved, not
  replayed; two under remat "stage"); one for the embedding's output and one for the head's
  input gradient. They sit on the critical path (not overlapped) and are added to the layers'
  times. Where a shared host's steps were fitted on `tensor` too, a one-stage block's time
  takes the fitted factor (`tensor_factor`).
- pipe: each virtual stage sends its output forward and receives its gradient back; each tensor
  rank sends its 1/t share of the activation (charged as `transfer_time`).
- data: the gradients (fp32, the device's own parameters) are all-reduced once per step after
  the last backward, not overlapped with it (jaxpipe's step reduces after the tick loop);
  ZeRO-1 and FSDP's reduce-scatter + all-gather move the same volume.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jaxpipe.config import ModelConfig, PipelineConfig
from jaxpipe.costs import DeviceProfile, ModelCosts
from jaxpipe.links import MeshLinks
from jaxpipe.placement import vocab_rows
from jaxpipe.schedule import SPLIT_SCHEDULES

GRAD_BYTES = 4  # gradients are float32, as the parameters
# A block's forward + backward with its forward recomputed, over without: one more forward of
# the three (the backward's two), unless the device profile measured its own figure.
REMAT_COST = 4 / 3


def recompute_factor(
    profile: DeviceProfile, remat: str, stages: int = 1, split: bool = False,
    busy: int | None = None,
) -> float:
    """A block's time under `remat` over its time without, on `stages` pipeline stages, in a
    split table or not, with `busy` of the stages running at once (min(M, S); None: all):
    `REMAT_COST`, or what the profile measured (`DeviceProfile.remat_cost`); 1 without remat.
    With costs fitted on S stages too (`DeviceProfile.fit`), a split table takes the split
    figure, and otherwise the cost goes geometrically from one stage to S with
    log(stages) / log(S), held beyond S: on a shared host recomputing gains most where every
    device runs the whole model at once. With a figure fitted for one stage busy at a time
    (`StepFit.remat_alone`), it goes from that one (busy = 1) to the former with
    log(busy) / log(stages): recomputing gains least where a single device computes."""
    if remat == "none":
        return 1.0
    one = REMAT_COST if profile.remat_cost is None else profile.remat_cost
    fit = profile.fit
    if fit is None or fit.stages <= 1 or stages <= 1:
        return one
    if split:
        return fit.remat_split
    staged = _between(one, fit.remat_staged, math.log(stages) / math.log(fit.stages))
    if fit.remat_alone is None or busy is None:
        return staged
    return _between(fit.remat_alone, staged, math.log(max(busy, 1)) / math.log(stages))


def split_factor(profile: DeviceProfile, split: bool) -> float:
    """A block's time in a split table (zero-bubble B and W) over its time with fused backward
    ops: 1 (B + W do the fused backward's work), or what a shared host's steps measured
    (`StepFit.split_cost`)."""
    return profile.fit.split_cost if split and profile.fit is not None else 1.0


def tensor_factor(profile: DeviceProfile, tensor: int, remat: str, stages: int = 1) -> float:
    """A block's time split over `tensor` ranks under `remat` over the model's figure for it
    (its share of the FLOPs and bytes, recomputation and all-reduces) on `stages` stages: 1,
    or where a shared host's steps were fitted at `StepFit.tensor` ranks on one stage,
    geometrically from 1 at one rank to the fitted `tensor_cost` (times `remat_tensor` under
    remat) with log(tensor) / log(StepFit.tensor), held beyond. Pipelined configurations keep
    the model's figure: on 8 forced CPU devices their measured steps erred both ways (pipe 2 x
    tensor 4 at 0.82-1.35x, pipe 4 x tensor 2 at 0.89-1.15x) where one stage's erred one way."""
    fit = profile.fit
    if fit is None or fit.tensor <= 1 or tensor <= 1 or stages > 1:
        return 1.0
    fitted = fit.tensor_cost * (1.0 if remat == "none" else fit.remat_tensor)
    return _between(1.0, fitted, math.log(tensor) / math.log(fit.tensor))


def concurrency(profile: DeviceProfile, data: int) -> float | None:
    """How many devices sharing a host's cores run at full speed at once (None: devices of
    their own) with `data`-way data parallelism: the profile's figure, or with a figure fitted
    for all devices on `data` (`StepFit.data_concurrency`), geometrically between the two with
    log(data) / log(devices)."""
    fit, shared = profile.fit, profile.concurrency
    if shared is None or fit is None or fit.data_concurrency is None or fit.devices <= 1:
        return shared
    return _between(shared, fit.data_concurrency, math.log(max(data, 1)) / math.log(fit.devices))


def _between(a: float, b: float, w: float) -> float:
    """a at w = 0, b at w >= 1, geometric in between."""
    w = min(1.0, max(0.0, w))
    return a ** (1 - w) * b**w


def outer_params(cfg: ModelConfig, tp: int, head_in_last: bool = True) -> tuple[float, float]:
    """Per-device parameters of the embedding and of the head with `tensor` = tp: the token
    table and an untied head kernel split their (padded) vocabulary over tp. A tied head inside
    the last stage holds its own copy of the table."""
    table = cfg.vocab_size * cfg.d_model
    shard = vocab_rows(cfg.vocab_size, tp) * cfg.d_model / tp
    embed = cfg.embed_params() - table + shard
    head = cfg.head_params() - (0 if cfg.tied else table) + shard
    return embed, head if head_in_last or not cfg.tied else head - shard


def tensor_all_reduces(remat: str) -> int:
    """All-reduces of one activation per block and micro-batch under tensor parallelism: two
    in the forward and two in the backward, and those of a replayed forward whose outputs the
    backward reads. Under remat "layer" that is the attention output's, not the MLP's (it makes
    the block's output, saved as the next block's input); under remat "stage" both (the stage's
    blocks replay in a loop, each making the next one's input)."""
    return {"none": 4, "layer": 5}.get(remat, 6)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Per-layer times (seconds, fwd + bwd, one micro-batch) and bytes, per device."""

    block_time: float  # compute (recomputation included) + tensor all-reduces
    embed_time: float
    head_time: float
    transfer_time: float  # activation forward + its gradient backward, per virtual stage
    block_params: float
    embed_params: float
    head_params: float
    block_act: float  # saved per block per micro-batch
    boundary_bytes: float  # one stage input
    temp_bytes: float  # working memory of the largest single layer program
    # What B hands W for a rematerialised block per micro-batch in a split table.
    block_carry: float = 0.0
    # One block's attention scores and probabilities per micro-batch (float32 and the compute
    # dtype) where the kernel materialises them (xla): what a replayed stage forward keeps.
    replay_scores: float = 0.0
    compute_bytes: float = 4.0  # bytes of the compute dtype (the blocks' converted copy)
    embed_in_first: bool = True
    head_in_last: bool = True
    block_comm_time: float = 0.0  # the tensor all-reduces inside block_time
    grad_reduce_per_param: float = 0.0  # data all-reduce seconds per parameter held
    grad_reduce_latency: float = 0.0
    # Shares of block_time that a forward and (in a split table) a W op take; a backward (B in
    # a split table) takes the rest. Without remat a forward is a third of forward + backward;
    # a recomputed forward counts to the backward (B).
    fwd_share: float = 1 / 3
    wgt_share: float = 1 / 3
    # Stages whose ops run at full speed at once where devices share cores (None: all): the
    # profile's concurrency over the data x tensor devices that run each stage's op alongside.
    concurrency: float | None = None

    @classmethod
    def from_costs(
        cls,
        costs: ModelCosts,
        profile: DeviceProfile,
        model_cfg: ModelConfig,
        pipe_cfg: PipelineConfig,
        times: dict | None = None,
        **flags,
    ) -> CostModel:
        """Charges compute from `costs` (or measured `times`) and communication from the
        profile's links; see the module docstring."""
        times = times or {
            k: getattr(costs, k).time(profile, head=k == "head") for k in ("block", "embed", "head")
        }
        D, S, T = pipe_cfg.data_parallel, pipe_cfg.num_stages, pipe_cfg.tensor_parallel
        links, mesh = profile.links, MeshLinks(D, S, T, profile.links.devices_per_node)
        act = costs.boundary_bytes
        all_reduce = links.all_reduce_time(act, T, mesh.tensor_crosses)
        block_comm = tensor_all_reduces(pipe_cfg.remat) * all_reduce
        split = pipe_cfg.schedule in SPLIT_SCHEDULES
        # Recomputing and splitting make the backward dearer; the forward's time stays.
        recompute = recompute_factor(
            profile, pipe_cfg.remat, S, split, min(pipe_cfg.num_microbatches, S)
        ) * split_factor(profile, split)
        shared = concurrency(profile, D)
        sent = act * boundary_scale(model_cfg, pipe_cfg) / T
        transfer = 2 * links.send_time(sent, mesh.pipe_crosses) if S > 1 else 0.0
        grad_per_byte, grad_latency = links.all_reduce_terms(D, mesh.data_crosses)
        embed_params, head_params = outer_params(model_cfg, T, flags.get("head_in_last", True))
        tensor = tensor_factor(profile, T, pipe_cfg.remat, S)
        return cls(
            block_time=(times["block"] * recompute + block_comm) * tensor,
            embed_time=times["embed"] + all_reduce,
            head_time=times["head"] + all_reduce,
            transfer_time=transfer,
            block_params=model_cfg.block_params() / T,
            embed_params=embed_params,
            head_params=head_params,
            block_act=costs.block.activation_bytes,
            boundary_bytes=costs.boundary_bytes,
            temp_bytes=max(costs.block.temp_bytes, costs.head.temp_bytes),
            block_carry=costs.block.carry_bytes,
            replay_scores=scores_bytes(model_cfg, costs.microbatch, costs.seq_len, T),
            compute_bytes=float(jnp.dtype(model_cfg.dtype).itemsize),
            block_comm_time=block_comm * tensor,
            grad_reduce_per_param=GRAD_BYTES * grad_per_byte,
            grad_reduce_latency=grad_latency,
            concurrency=None if shared is None else shared / (D * T),
            fwd_share=1 / (3 * recompute),
            wgt_share=costs.w_share * 2 / (3 * recompute),
            **flags,
        )

    def extra_time(self, s: int, S: int, head_stage: int | None = None) -> float:
        """Embedding and head time on stage s; the head is on `head_stage` (default S - 1;
        stage 0 when virtual stages are placed in a V)."""
        head_stage = S - 1 if head_stage is None else head_stage
        return (self.embed_time if s == 0 and self.embed_in_first else 0.0) + (
            self.head_time if s == head_stage and self.head_in_last else 0.0
        )

    def grad_reduce_time(self, params: float) -> float:
        """The data-parallel gradient all-reduce of a device holding `params` parameters."""
        return params * self.grad_reduce_per_param + self.grad_reduce_latency * (params > 0)


def scores_bytes(model_cfg: ModelConfig, microbatch: int, seq_len: int, tp: int) -> float:
    """Bytes of one block's attention scores [b, H / tp, T, T] in float32 plus its
    probabilities in the compute dtype, where the kernel materialises them (`xla`); 0 for the
    fused kernels (splash, cudnn)."""
    if model_cfg.attention != "xla":
        return 0.0
    itemsize = jnp.dtype(model_cfg.dtype).itemsize
    return microbatch * model_cfg.num_heads / tp * seq_len**2 * (4 + itemsize)


def boundary_scale(model_cfg: ModelConfig, pipe_cfg: PipelineConfig) -> float:
    """Bytes of a stage boundary in `boundary_dtype` over bytes in the compute dtype."""
    if pipe_cfg.boundary_dtype is None:
        return 1.0
    return jnp.dtype(pipe_cfg.boundary_dtype).itemsize / jnp.dtype(model_cfg.dtype).itemsize
