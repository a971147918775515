"""Links between devices and what collectives cost over them.

A cluster is nodes of `devices_per_node` devices: a fast link inside a node (NVLink, or a TPU
slice's ICI) and a slower one between nodes (InfiniBand, or DCN), each with a per-device
bandwidth in one direction (bytes/s) and a per-message latency (s). The mesh is
`data x pipe x tensor` with `tensor` varying fastest over consecutive device ids, so a tensor
group of t devices stays inside a node when t divides the node, a pipe ring stays inside when
t x pipe does, and a data group when the whole mesh does.

Costs (bandwidth-optimal ring algorithms, the slowest link of the group setting the pace):
a send of n bytes takes latency + n / bandwidth; an all-reduce of n bytes over k devices takes
2 (k - 1) latencies + 2 (k - 1) / k x n / bandwidth (a reduce-scatter plus an all-gather, so
ZeRO-1 and FSDP's split reductions cost the same volume). Forced CPU devices measure their
own all-reduce instead (`Links.reduce_latency`): there it is one rendezvous, not a ring.
"""

from __future__ import annotations

import dataclasses

from jaxpipe.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Links:
    """Per-device link figures of one device type's cluster.

    efficiency: the achieved share of the spec-sheet bandwidths (protocol, NCCL/XLA overheads).
    reduce_bandwidth, reduce_latency: a measured all-reduce inside a node that is not a ring of
    messages (forced CPU devices: one rendezvous and copies in shared memory); when set, an
    all-reduce of n bytes inside a node takes reduce_latency + n / reduce_bandwidth at any
    group size.
    """

    intra_bandwidth: float
    inter_bandwidth: float
    intra_latency: float = 0.0
    inter_latency: float = 0.0
    devices_per_node: int = 1
    efficiency: float = 1.0
    reduce_bandwidth: float | None = None
    reduce_latency: float | None = None

    def __post_init__(self):
        if self.devices_per_node < 1:
            raise ConfigError(f"devices per node must be >= 1, got {self.devices_per_node}")
        if min(self.intra_bandwidth, self.inter_bandwidth) <= 0 or self.efficiency <= 0:
            raise ConfigError("link bandwidths and efficiency must be > 0")
        if (self.reduce_bandwidth is None) != (self.reduce_latency is None):
            raise ConfigError("give reduce_bandwidth and reduce_latency together, or neither")
        if self.reduce_bandwidth is not None and not (
            self.reduce_bandwidth > 0 and self.reduce_latency >= 0
        ):
            raise ConfigError("a measured all-reduce needs reduce_bandwidth > 0 and "
                              "reduce_latency >= 0")

    def replace(self, **kw) -> Links:
        return dataclasses.replace(self, **kw)

    def link(self, crosses_nodes: bool) -> tuple[float, float]:
        """(achieved bandwidth, latency) of the link a group uses."""
        if crosses_nodes:
            return self.inter_bandwidth * self.efficiency, self.inter_latency
        return self.intra_bandwidth * self.efficiency, self.intra_latency

    def send_time(self, nbytes: float, crosses_nodes: bool) -> float:
        """One point-to-point message of `nbytes` (each device sends its own)."""
        bandwidth, latency = self.link(crosses_nodes)
        return latency + nbytes / bandwidth

    def all_reduce_terms(self, group: int, crosses_nodes: bool) -> tuple[float, float]:
        """(seconds per byte, seconds) of an all-reduce over `group` devices: n bytes per
        device take n x the first + the second (0, 0 for one device)."""
        if group <= 1:
            return 0.0, 0.0
        if self.reduce_latency is not None and not crosses_nodes:
            return 1 / self.reduce_bandwidth, self.reduce_latency
        bandwidth, latency = self.link(crosses_nodes)
        return 2 * (group - 1) / group / bandwidth, 2 * (group - 1) * latency

    def all_reduce_time(self, nbytes: float, group: int, crosses_nodes: bool) -> float:
        """An all-reduce of `nbytes` per device over `group` devices (0 for one device)."""
        per_byte, latency = self.all_reduce_terms(group, crosses_nodes)
        return latency + nbytes * per_byte


def crosses_nodes(stride: int, size: int, devices_per_node: int) -> bool:
    """Whether a mesh-axis group (devices `stride` apart, `size` of them) spans nodes."""
    span = stride * size
    return size > 1 and (span > devices_per_node or devices_per_node % span != 0)


@dataclasses.dataclass(frozen=True)
class MeshLinks:
    """Which link each axis of a `data x pipe x tensor` mesh uses."""

    data: int
    pipe: int
    tensor: int
    devices_per_node: int

    @property
    def tensor_crosses(self) -> bool:
        return crosses_nodes(1, self.tensor, self.devices_per_node)

    @property
    def pipe_crosses(self) -> bool:
        return crosses_nodes(self.tensor, self.pipe, self.devices_per_node)

    @property
    def data_crosses(self) -> bool:
        return crosses_nodes(self.tensor * self.pipe, self.data, self.devices_per_node)
