"""The one map between the canonical `[layers, ...]` block stack and the pipeline view.

Virtual stage v holds a contiguous run of layers; virtual stages are visited in order, so layer
order is preserved for every S, R and partition. Which (stage s, repeat r) holds v is the
schedule table's placement (`schedule.virtual_stage`): v = r * S + s ("loop"), or every odd
repeat reversed ("vee", ZB-V: device d holds virtual stages d and 2S - 1 - d). The
pipeline view of a stacked leaf is `[S, R, J, ...]` where J is the largest virtual stage's layer
count; slots past a virtual stage's count are padding (zeros, skipped by the executor). When
every virtual stage holds J layers the two views are a reshape and a transpose of each other
(sharded arrays then move without gathers); otherwise a gather by `layer_index_SRJ`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe.config import ConfigError
from jaxpipe.schedule import virtual_stage


@dataclasses.dataclass(frozen=True)
class StageLayout:
    num_stages: int
    num_repeats: int
    layer_counts: tuple[int, ...]  # per virtual stage v
    placement: str = "loop"  # which (stage, repeat) holds v: `schedule.virtual_stage`

    def __post_init__(self):
        if len(self.layer_counts) != self.num_stages * self.num_repeats:
            raise ConfigError(
                f"{len(self.layer_counts)} layer counts given for num_stages x num_repeats = "
                f"{self.num_stages} x {self.num_repeats} virtual stages"
            )
        if min(self.layer_counts) < 1:
            raise ConfigError(f"every virtual stage needs >= 1 layer, got {self.layer_counts}")
        virtual_stage(self.placement, self.num_stages, 0, 0)  # refuses an unknown placement

    @classmethod
    def uniform(
        cls, num_layers: int, num_stages: int, num_repeats: int = 1, placement: str = "loop"
    ) -> StageLayout:
        """Equal layers per virtual stage; a remainder goes one extra layer to the middle ones."""
        V = num_stages * num_repeats
        if num_layers < V:
            raise ConfigError(
                f"{num_layers} layers cannot fill num_stages x num_repeats = {num_stages} x "
                f"{num_repeats} = {V} virtual stages; use fewer stages or repeats"
            )
        base, extra = divmod(num_layers, V)
        # Spread the remainder away from the first and last virtual stage, which usually carry
        # the embedding and the head.
        order = sorted(range(V), key=lambda v: (abs(v - (V - 1) / 2), v))
        counts = [base] * V
        for v in order[:extra]:
            counts[v] += 1
        return cls(num_stages, num_repeats, tuple(counts), placement)

    @property
    def num_layers(self) -> int:
        return sum(self.layer_counts)

    @property
    def slots(self) -> int:
        return max(self.layer_counts)

    @property
    def v_SR(self) -> np.ndarray:
        """Virtual stage held by each (stage, repeat)."""
        s, r = np.meshgrid(np.arange(self.num_stages), np.arange(self.num_repeats), indexing="ij")
        return virtual_stage(self.placement, self.num_stages, s, r)

    @property
    def counts_SR(self) -> np.ndarray:
        return np.asarray(self.layer_counts, np.int32)[self.v_SR]

    def looped(self) -> StageLayout:
        """The same layer counts in the "loop" placement (what the ring executor runs)."""
        return dataclasses.replace(self, placement="loop")

    def to_loop(self, blocks_SRJ):
        """Pipeline leaves in this placement -> in `looped()`'s: a "vee" layout's odd repeats
        are reversed over stages (a permute across `pipe` under jit); "loop" ones unchanged."""
        if self.placement == "loop":
            return blocks_SRJ
        flip = np.arange(self.num_repeats) % 2 == 1
        mask = lambda a: flip.reshape((1, -1) + (1,) * (a.ndim - 2))
        return jax.tree.map(lambda a: jnp.where(mask(a), a[::-1], a), blocks_SRJ)

    @property
    def layer_index_SRJ(self) -> np.ndarray:
        """Canonical layer index of each pipeline slot, -1 for padding."""
        S, R, J = self.num_stages, self.num_repeats, self.slots
        index = -np.ones((S, R, J), np.int32)
        starts = np.cumsum((0,) + self.layer_counts)
        for (s, r), v in np.ndenumerate(self.v_SR):
            count = self.layer_counts[v]
            index[s, r, :count] = np.arange(starts[v], starts[v] + count)
        return index

    @property
    def is_even(self) -> bool:
        """Every virtual stage holds the same number of layers (no padding slots)."""
        return len(set(self.layer_counts)) == 1

    @property
    def padding_slots(self) -> int:
        return self.num_stages * self.num_repeats * self.slots - self.num_layers

    def stage_ranges(self) -> list[list[tuple[int, int]]]:
        """For each stage, the [start, end) layer ranges of its repeats."""
        index = self.layer_index_SRJ
        out = []
        for s in range(self.num_stages):
            out.append([(int(row[0]), int(row[row >= 0][-1]) + 1) for row in index[s]])
        return out

    def describe(self) -> str:
        return " | ".join(
            "+".join(f"{a}-{b - 1}" for a, b in ranges) for ranges in self.stage_ranges()
        )

    def check_matches(self, num_layers: int) -> None:
        if num_layers != self.num_layers:
            raise ConfigError(
                f"layout covers {self.num_layers} layers but the model has {num_layers}"
            )

    def to_pipeline(self, blocks):
        """Canonical `[L, ...]` leaves -> pipeline `[S, R, J, ...]` leaves (padding = 0)."""
        index = self.layer_index_SRJ
        gather = jnp.asarray(np.maximum(index, 0))
        pad = jnp.asarray(index < 0)
        S, R, J = index.shape

        def one(leaf):
            self.check_matches(leaf.shape[0])
            if self.is_even and self.placement == "loop":  # layer (r * S + s) * J + j: a reshape
                return jnp.asarray(leaf).reshape(R, S, J, *leaf.shape[1:]).swapaxes(0, 1)
            out = leaf[gather]
            mask = pad.reshape(pad.shape + (1,) * (leaf.ndim - 1))
            return jnp.where(mask, jnp.zeros((), leaf.dtype), out)

        return jax.tree.map(one, blocks)

    def to_canonical(self, blocks_SRJ):
        """Pipeline `[S, R, J, ...]` leaves -> canonical `[L, ...]` leaves (padding dropped)."""
        if self.is_even and self.placement == "loop":
            return jax.tree.map(
                lambda a: jnp.asarray(a).swapaxes(0, 1).reshape((-1,) + a.shape[3:]), blocks_SRJ
            )
        flat = self.layer_index_SRJ.reshape(-1)
        take = jnp.asarray(np.argsort(np.where(flat < 0, np.iinfo(np.int32).max, flat))[
            : self.num_layers
        ])
        return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[3:])[take], blocks_SRJ)
