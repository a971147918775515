"""Published training runs the planner is checked against.

Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM" (SC'21): A100-80GB nodes of 8 GPUs (NVLink inside, 8 x 200 Gb/s InfiniBand a
node), sequence 2,048, vocabulary 51,200, full activation recomputation (jaxpipe's remat
"layer"), the interleaved schedule, micro-batch 1, layers split evenly, the embedding on the
first stage and the head on the last; throughput counted with the paper's Eq. 3.

- GPT-3 175B on 1,024 GPUs, global batch 1,536: 140 TFLOP/s per GPU. The paper does not give
  this run's mesh; taken here as tensor 8 x pipe 16 x data 8 (its 175B runs use tensor 8, and
  96 layers split over 16 stages as 2 chunks of 3), hence 192 micro-batches.
- The 1T model (128 layers, hidden 25,600, 160 heads) on 3,072 GPUs, tensor 8 x pipe 64 x
  data 6, global batch 3,072: 163 TFLOP/s per GPU (52 % of 312); 512 micro-batches, 2 chunks.

The a100-80gb profile's matmul efficiency (`costs.A100_FLOPS_EFFICIENCY`) is fitted to the 1T
run only; the 175B run is the check.
"""

from __future__ import annotations

import dataclasses

from jaxpipe.autotune import Cluster, LayerCosts, plan_for
from jaxpipe.config import ModelConfig, PipelineConfig
from jaxpipe.costs import DeviceProfile
from jaxpipe.flops import megatron_eq3
from jaxpipe.report import Plan


@dataclasses.dataclass(frozen=True)
class Anchor:
    name: str
    model_cfg: ModelConfig
    pipe_cfg: PipelineConfig
    global_batch: int
    seq_len: int
    published_tflops: float  # per GPU, Eq. 3
    fitted: bool  # whether the a100 profile's efficiency was fitted to this run

    @property
    def num_devices(self) -> int:
        return self.pipe_cfg.num_devices

    def tflops(self, step_time_s: float) -> float:
        """Per-GPU TFLOP/s of a step of this length, counted with Eq. 3."""
        m = self.model_cfg
        flops = megatron_eq3(self.global_batch, self.seq_len, m.num_layers, m.d_model,
                             m.vocab_size)
        return flops / (step_time_s * self.num_devices) / 1e12


def _gpt(name: str, layers: int, hidden: int, heads: int) -> ModelConfig:
    return ModelConfig(name, "gpt2", 51200, layers, hidden, heads, None, None, 2048,
                       dtype="bfloat16")


def _megatron(d: int, p: int, t: int, batch: int) -> PipelineConfig:
    return PipelineConfig(p, batch // d, 2, "interleaved_1f1b", "layer", data_parallel=d,
                          tensor_parallel=t, embed_head="inside")


ANCHORS = (
    Anchor("gpt3-175b", _gpt("megatron-175b", 96, 12288, 96), _megatron(8, 16, 8, 1536), 1536,
           2048, 140.0, fitted=False),
    Anchor("megatron-1t", _gpt("megatron-1t", 128, 25600, 160), _megatron(6, 64, 8, 3072), 3072,
           2048, 163.0, fitted=True),
)


def predict(anchor: Anchor, costs: LayerCosts | None = None,
            profile: DeviceProfile | None = None) -> Plan:
    """The planner's plan of the published configuration (its memory not checked)."""
    costs = costs or LayerCosts.compile(anchor.model_cfg, anchor.seq_len)
    profile = profile or Cluster(anchor.num_devices, "a100-80gb", 8).profile()
    b = anchor.global_batch // (anchor.pipe_cfg.num_microbatches * anchor.pipe_cfg.data_parallel)
    c = costs.at(b, anchor.pipe_cfg.tensor_parallel)
    return plan_for(anchor.model_cfg, anchor.pipe_cfg, c, profile, method="uniform", fit=False)
