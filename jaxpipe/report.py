"""The partition plan and its report: a table, JSON, and a compact layout string."""

from __future__ import annotations

import dataclasses
import json

from jaxpipe.config import ModelConfig, PipelineConfig
from jaxpipe.costmodel import CostModel
from jaxpipe.layout import StageLayout


@dataclasses.dataclass(frozen=True)
class StageReport:
    ranges: tuple[tuple[int, int], ...]  # [start, end) layers of each repeat
    time_s: float  # predicted fwd + bwd seconds per micro-batch (sum over repeats)
    memory_bytes: float
    params: int  # parameters owned by this stage (per device under tensor parallelism)
    in_flight: float  # micro-batches' worth of activations held at the peak (executor's table)

    @property
    def num_layers(self) -> int:
        return sum(b - a for a, b in self.ranges)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A stage layout with its predicted per-stage time, memory and parameters.

    bottleneck_ratio: slowest / mean stage time. padding_bytes: parameter, gradient and
    optimizer bytes of padded slots over all stages (SPMD pads every stage to the largest).
    bubble_fraction: idle share of the cells of the table the executor runs. step_time_s: that
    table simulated tick by tick (each tick as long as its slowest op plus the link), plus any
    embedding / head run outside the pipeline, plus the slowest stage's data-parallel gradient
    all-reduce (not overlapped).
    """

    model_cfg: ModelConfig
    pipe_cfg: PipelineConfig
    layout: StageLayout
    method: str
    device: str
    stages: tuple[StageReport, ...]
    vstage_times: tuple[float, ...]
    cost_model: CostModel
    bottleneck_ratio: float
    padding_bytes: float
    bubble_fraction: float
    step_time_s: float
    grad_reduce_s: float = 0.0  # the data-parallel gradient all-reduce, inside step_time_s

    @property
    def stage_times(self) -> list[float]:
        return [s.time_s for s in self.stages]

    def layout_string(self) -> str:
        """`E+t*11 | t*12 | ... | t*11+H`; repeats of one stage are joined by `,`."""
        S, R = self.pipe_cfg.num_stages, self.pipe_cfg.num_repeats
        counts, v_SR = self.layout.layer_counts, self.layout.v_SR
        cm = self.cost_model
        parts = []
        for s in range(S):
            reps = []
            for r in range(R):
                v = int(v_SR[s, r])
                cell = f"t*{counts[v]}"
                if v == 0 and cm.embed_in_first:
                    cell = "E+" + cell
                if v == S * R - 1 and cm.head_in_last:
                    cell += "+H"
                reps.append(cell)
            parts.append(",".join(reps))
        return " | ".join(parts)

    def to_dict(self) -> dict:
        return {
            "model": self.model_cfg.name,
            "device": self.device,
            "method": self.method,
            "num_stages": self.pipe_cfg.num_stages,
            "num_repeats": self.pipe_cfg.num_repeats,
            "num_microbatches": self.pipe_cfg.num_microbatches,
            "schedule": self.pipe_cfg.schedule,
            "remat": self.pipe_cfg.remat,
            "layout": self.layout_string(),
            "layer_counts": list(self.layout.layer_counts),
            "stages": [
                {
                    "stage": s,
                    "layers": [list(r) for r in st.ranges],
                    "num_layers": st.num_layers,
                    "time_s": st.time_s,
                    "memory_bytes": st.memory_bytes,
                    "params": st.params,
                    "in_flight": st.in_flight,
                }
                for s, st in enumerate(self.stages)
            ],
            "bottleneck_ratio": self.bottleneck_ratio,
            "padding_bytes": self.padding_bytes,
            "bubble_fraction": self.bubble_fraction,
            "step_time_s": self.step_time_s,
            "grad_reduce_s": self.grad_reduce_s,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        head = f"{'stage':>5}  {'layers':<16} {'n':>4} {'time ms':>10} {'mem GiB':>9} "
        head += f"{'params':>10} {'in flight':>9}"
        rows = [
            f"plan: {self.model_cfg.name} on {self.pipe_cfg.num_stages} x {self.device}, "
            f"method {self.method}, schedule {self.pipe_cfg.schedule}, "
            f"M={self.pipe_cfg.num_microbatches}, R={self.pipe_cfg.num_repeats}",
            head,
        ]
        for s, st in enumerate(self.stages):
            ranges = ",".join(f"{a}-{b - 1}" for a, b in st.ranges)
            rows.append(
                f"{s:>5}  {ranges:<16} {st.num_layers:>4} {st.time_s * 1e3:>10.3f} "
                f"{st.memory_bytes / 2**30:>9.2f} {_count(st.params):>10} {st.in_flight:>9.4g}"
            )
        rows += [
            f"layout: {self.layout_string()}",
            f"bottleneck (max/mean stage time) {self.bottleneck_ratio:.3f}, padding "
            f"{self.padding_bytes / 2**30:.2f} GiB, bubble {self.bubble_fraction:.3f}, "
            f"predicted step {self.step_time_s * 1e3:.2f} ms",
        ]
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def _count(n: float) -> str:
    for unit, k in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= k:
            return f"{n / k:.2f}{unit}"
    return str(int(n))
