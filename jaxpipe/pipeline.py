"""The `shard_map` executor: runs a stage layout and a ring schedule table on the `pipe` axis.

Inside `shard_map` every stage runs the same program: a `lax.scan` over the table's ticks. At
each tick a stage looks up its op (micro-batch m, repeat r), runs its r-th group of layers on
its input (skipped with `lax.cond` on idle ticks and padded slots, so bubbles cost no FLOPs),
and sends the result to the next stage with `ppermute` around the ring. Stage 0 keeps one
buffer of M micro-batches: it starts as the embedded inputs, and whatever the last stage sends
back is written into it, so it holds each micro-batch's latest activation: the input of the
next repeat, and after the last repeat the pipeline's output.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxpipe import model as M
from jaxpipe import placement
from jaxpipe.config import ConfigError, ModelConfig, PipelineConfig
from jaxpipe.layout import StageLayout
from jaxpipe.schedule import ScheduleTable, build_table


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Everything static about a pipelined model: shapes, layout, table, mesh."""

    model: ModelConfig
    config: PipelineConfig
    layout: StageLayout
    table: ScheduleTable
    mesh: Mesh
    poison_bubbles: bool = False  # test mode: idle ticks emit NaN so any leak shows

    @classmethod
    def create(
        cls,
        model: ModelConfig,
        config: PipelineConfig,
        mesh: Mesh,
        layout: StageLayout | None = None,
        poison_bubbles: bool = False,
    ) -> Pipeline:
        config.check_layers(model.num_layers)
        if layout is None:
            layout = StageLayout.uniform(model.num_layers, config.num_stages, config.num_repeats)
        if (layout.num_stages, layout.num_repeats) != (config.num_stages, config.num_repeats):
            raise ConfigError(
                f"layout is for {layout.num_stages} stages x {layout.num_repeats} repeats, the "
                f"pipeline config for {config.num_stages} x {config.num_repeats}"
            )
        layout.check_matches(model.num_layers)
        if mesh.shape["pipe"] != config.num_stages:
            raise ConfigError(
                f"mesh has pipe={mesh.shape['pipe']} but num_stages={config.num_stages}"
            )
        table = build_table(
            config.schedule, config.num_stages, config.num_microbatches, config.num_repeats
        )
        return cls(model, config, layout, table, mesh, poison_bubbles)

    # -- parameters ----------------------------------------------------------------------------

    def to_pipeline(self, params):
        """Canonical params -> params whose blocks are in the `[S, R, J, ...]` view."""
        return {**params, "blocks": self.layout.to_pipeline(params["blocks"])}

    def to_canonical(self, params):
        return {**params, "blocks": self.layout.to_canonical(params["blocks"])}

    def param_shardings(self, params):
        """Blocks on `pipe` (stage axis) and `tensor` (Megatron split); see `placement.py`."""
        return placement.param_shardings(self.mesh, params, self.model)

    def batch_sharding(self):
        return placement.batch_sharding(self.mesh)

    def place(self, params):
        """Canonical params -> pipeline-layout params placed on the mesh."""
        pipe = jax.jit(self.to_pipeline)(params)
        return jax.device_put(pipe, self.param_shardings(pipe))

    # -- forward -------------------------------------------------------------------------------

    def microbatch(self, x_BTD):
        """[B, ...] -> [M, B/M, ...]; row b goes to micro-batch b mod M (keeps data shards local)."""
        Mb = self.config.num_microbatches
        B = x_BTD.shape[0]
        self.config.check_batch(B)
        return x_BTD.reshape(B // Mb, Mb, *x_BTD.shape[1:]).swapaxes(0, 1)

    def unmicrobatch(self, x_MBTD):
        x = x_MBTD.swapaxes(0, 1)
        return x.reshape(-1, *x.shape[2:])

    def blocks_forward(self, blocks_SRJ, x_BTD):
        """Runs the whole block stack, pipelined, on activations of shape [B, T, D]."""
        x_MBTD = self.microbatch(x_BTD)
        y_SMBTD = jax.shard_map(
            self._stage_program,
            mesh=self.mesh,
            in_specs=(P("pipe"), P()),
            out_specs=P("pipe"),
            axis_names={"pipe"},
        )(blocks_SRJ, x_MBTD)
        return self.unmicrobatch(y_SMBTD[0].astype(x_BTD.dtype))

    def logits(self, params, tokens_BT):
        """Vocabulary logits [B, T, V] with blocks pipelined; params in the pipeline layout."""
        x_BTD = M.embed_apply(self.model, params, tokens_BT)
        x_BTD = self.blocks_forward(params["blocks"], x_BTD)
        return M.head_apply(self.model, params, x_BTD)

    def loss(self, params, tokens_BT1):
        """Next-token loss on tokens [B, T+1]; params in the pipeline layout."""
        return M.cross_entropy(self.logits(params, tokens_BT1[:, :-1]), tokens_BT1[:, 1:])

    def value_and_grad(self, params, tokens_BT1):
        """(loss, grads) with grads in the same pipeline layout as params."""
        return jax.value_and_grad(self.loss)(params, tokens_BT1)

    # -- the per-stage program -----------------------------------------------------------------

    def _stage_fn(self):
        cfg, remat = self.model, self.config.remat
        layer = lambda p, h: M.block_apply(cfg, p, h)
        if remat == "layer":
            layer = jax.checkpoint(layer)

        def run_stage(w_RJ, r, count, h):
            w_J = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, r, 0, False), w_RJ)

            def slot(h, j_p):
                j, p = j_p
                return jax.lax.cond(j < count, lambda h: layer(p, h), lambda h: h, h), None

            J = self.layout.slots
            return jax.lax.scan(slot, h, (jnp.arange(J), w_J))[0]

        if remat == "stage":
            run_stage = jax.checkpoint(run_stage)
        return run_stage

    def _stage_program(self, w_1RJ, x_MBTD):
        S, T = self.config.num_stages, self.table.num_ticks
        tab = self.table
        act_dtype = x_MBTD.dtype
        send_dtype = jnp.dtype(self.config.boundary_dtype or act_dtype)
        # What the last stage sent at tick t - 1 arrives at stage 0 at tick t (t = 0..T).
        arrive_micro = jnp.asarray(np.concatenate([[0], np.maximum(tab.micro[:, S - 1], 0)]))
        arrive_ok = jnp.asarray(np.concatenate([[False], tab.busy[:, S - 1]]))
        micro_TS = jnp.asarray(np.maximum(tab.micro, 0))
        repeat_TS = jnp.asarray(np.maximum(tab.repeat, 0))
        busy_TS = jnp.asarray(tab.busy)
        counts_SR = jnp.asarray(self.layout.counts_SR)
        run_stage = self._stage_fn()
        perm = [(i, (i + 1) % S) for i in range(S)]

        s = jax.lax.axis_index("pipe")
        w_RJ = jax.tree.map(lambda a: a[0], w_1RJ)
        buf_MBTD = jax.lax.pcast(x_MBTD.astype(send_dtype), "pipe", to="varying")
        fill = jnp.nan if self.poison_bubbles else 0.0
        recv_BTD = jnp.full_like(buf_MBTD[0], fill)

        def absorb(buf_MBTD, recv_BTD, t):
            m = arrive_micro[t]
            keep = jnp.where((s == 0) & arrive_ok[t], recv_BTD, buf_MBTD[m])
            return jax.lax.dynamic_update_index_in_dim(buf_MBTD, keep, m, 0)

        def idle(h):
            return jnp.full_like(h, jnp.nan) if self.poison_bubbles else h

        def tick(carry, t):
            buf_MBTD, recv_BTD = carry
            buf_MBTD = absorb(buf_MBTD, recv_BTD, t)
            m, r = micro_TS[t, s], repeat_TS[t, s]
            h_BTD = jnp.where(s == 0, buf_MBTD[m], recv_BTD).astype(act_dtype)
            h_BTD = placement.constrain_activation(h_BTD)  # batch on `data` inside the stage
            h_BTD = jax.lax.cond(
                busy_TS[t, s], functools.partial(run_stage, w_RJ, r, counts_SR[s, r]), idle, h_BTD
            )
            recv_BTD = jax.lax.ppermute(h_BTD.astype(send_dtype), "pipe", perm)
            return (buf_MBTD, recv_BTD), None

        (buf_MBTD, recv_BTD), _ = jax.lax.scan(tick, (buf_MBTD, recv_BTD), jnp.arange(T))
        return absorb(buf_MBTD, recv_BTD, T)[None]
