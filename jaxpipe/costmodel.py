"""The planner's cost model: per-layer seconds and bytes of one micro-batch on one device."""

from __future__ import annotations

import dataclasses

from jaxpipe.config import ModelConfig
from jaxpipe.costs import DeviceProfile, ModelCosts
from jaxpipe.placement import vocab_rows


def outer_params(cfg: ModelConfig, tp: int, head_in_last: bool = True) -> tuple[float, float]:
    """Per-device parameters of the embedding and of the head with `tensor` = tp: the token
    table and an untied head kernel split their (padded) vocabulary over tp. A tied head inside
    the last stage holds its own copy of the table."""
    table = cfg.vocab_size * cfg.d_model
    shard = vocab_rows(cfg.vocab_size, tp) * cfg.d_model / tp
    embed = cfg.embed_params() - table + shard
    head = cfg.head_params() - (0 if cfg.tied else table) + shard
    return embed, head if head_in_last or not cfg.tied else head - shard


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Per-layer times (seconds, fwd + bwd, one micro-batch) and bytes, per device."""

    block_time: float
    embed_time: float
    head_time: float
    transfer_time: float  # activation forward + its gradient backward, per virtual stage
    block_params: float
    embed_params: float
    head_params: float
    block_act: float  # saved per block per micro-batch
    embed_act: float
    head_act: float
    boundary_bytes: float  # one stage input
    temp_bytes: float  # working memory of the largest single layer program
    embed_in_first: bool = True
    head_in_last: bool = True

    @classmethod
    def from_costs(
        cls,
        costs: ModelCosts,
        profile: DeviceProfile,
        model_cfg: ModelConfig,
        tp: int,
        times: dict | None = None,
        **flags,
    ) -> CostModel:
        times = times or {
            k: getattr(costs, k).time(profile, head=k == "head") for k in ("block", "embed", "head")
        }
        embed_params, head_params = outer_params(model_cfg, tp, flags.get("head_in_last", True))
        return cls(
            block_time=times["block"],
            embed_time=times["embed"],
            head_time=times["head"],
            transfer_time=2 * costs.boundary_bytes / profile.link_bandwidth,
            block_params=model_cfg.block_params() / tp,
            embed_params=embed_params,
            head_params=head_params,
            block_act=costs.block.activation_bytes,
            embed_act=costs.embed.activation_bytes,
            head_act=costs.head.activation_bytes,
            boundary_bytes=costs.boundary_bytes,
            temp_bytes=max(costs.block.temp_bytes, costs.head.temp_bytes),
            **flags,
        )

    def extra_time(self, s: int, S: int, head_stage: int | None = None) -> float:
        """Embedding and head time on stage s; the head is on `head_stage` (default S - 1;
        stage 0 when virtual stages are placed in a V)."""
        head_stage = S - 1 if head_stage is None else head_stage
        return (self.embed_time if s == 0 and self.embed_in_first else 0.0) + (
            self.head_time if s == head_stage and self.head_in_last else 0.0
        )
