"""The ring executor: runs a stage layout and a forward-only ring table on the `pipe` axis.

It runs `loss` and `logits` for every schedule, and the training step (autodiff of the same
loop) of GPipe and circular with overlapped sends (hop 2); every other training step runs the
forward + backward table in `onef1b` (`Pipeline.value_and_grad` dispatches on the table).

Inside `shard_map` every stage runs the same program: one `lax.scan` over the table's ticks
and, within each tick, over the stage's layer slots. At each tick a stage looks up its op
(micro-batch m, repeat r), runs its r-th group of layers on its input one slot per iteration
(skipped with `lax.cond` on idle ticks and padded slots, so bubbles cost no FLOPs), and at the
tick's last slot sends the result to the next stage with `ppermute` around the ring. Stage 0
keeps one buffer of M micro-batches: it starts as the embedded inputs, and whatever the last
stage sends back is written into it, so it holds each micro-batch's latest activation: the input
of the next repeat, and after the last repeat the pipeline's output.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxpipe import model as M
from jaxpipe import onef1b, placement
from jaxpipe.config import ConfigError, ModelConfig, PipelineConfig
from jaxpipe.layout import StageLayout
from jaxpipe.schedule import ScheduleTable, build_table, ring_table

# Residual policies of one iteration of the tick loop (one unit) by remat mode. Without remat it
# keeps what a lean block keeps (`model.KEEP_POLICY`): not the weight slice (in the compute
# dtype) the iteration reads, which the backward slices again from the stage's stack (saving it
# would stack a copy of the stage's weights per iteration), nor views and broadcasts such as
# the attention mask (saved broadcast, a [B, H, T, T] boolean per iteration: 22 GiB of
# llama-1b's GPipe step on v5p:2x2x1). An outer policy applies inside the block's own
# checkpoints too, so the block's choice has to be spelled here. With remat it keeps only the
# unit's input.
_UNIT_POLICY = {
    "none": M.KEEP_POLICY,
    "layer": jax.checkpoint_policies.nothing_saveable,
    "stage": jax.checkpoint_policies.nothing_saveable,
}


def compiler_options(devices) -> dict | None:
    """XLA options for programs that run the executors' tick loops on `devices`.

    On CPU: region-based copy insertion. Without it, the CPU compiler copies loop-carried
    buffers of the ring executors (GPipe, circular) that one tick both reads and updates (24 more
    copies in a GPipe step of `tiny` at S = 4, M = 8). The forward + backward executor
    (`onef1b`) is written so that it updates its stash in place under the default copy
    insertion too, as on GPU and TPU. Other platforms keep their defaults.
    """
    if {d.platform for d in devices} == {"cpu"}:
        return {"xla_cpu_copy_insertion_use_region_analysis": True}
    return None


def _pick(pred, on_true, on_false):
    """`on_true` if the scalar `pred` holds, else `on_false` (same shape, cast to on_true's
    dtype), selected whole: `jnp.where` would broadcast the predicate to the operands' shape,
    and autodiff of the tick loop would then save that broadcast every iteration."""
    return jax.lax.select(pred, on_true, on_false.astype(on_true.dtype))


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Everything static about a pipelined model: shapes, layout, table, mesh."""

    model: ModelConfig
    config: PipelineConfig
    layout: StageLayout
    table: ScheduleTable
    mesh: Mesh
    poison_bubbles: bool = False  # test mode: idle ticks emit NaN so any leak shows

    @property
    def forward_table(self) -> ScheduleTable:
        """The forward-only ring table that `loss` and `logits` run (the schedule's own table
        when it has no backward ops; for 1F1B schedules, circular GPipe of the same shape)."""
        if not self.table.explicit_backward:
            return self.table
        c = self.config
        name = "circular" if c.num_repeats > 1 else "gpipe"
        return ring_table(name, c.num_stages, c.num_microbatches, c.num_repeats)

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
        table = build_table(
            config.schedule, config.num_stages, config.num_microbatches, config.num_repeats,
            config.hop,
        )
        if layout is None:
            layout = StageLayout.uniform(
                model.num_layers, config.num_stages, config.num_repeats, table.placement
            )
        if layout.placement != table.placement:
            raise ConfigError(
                f"layout places virtual stages {layout.placement!r}, schedule "
                f"{config.schedule!r} runs them {table.placement!r}; build the layout with "
                f"placement={table.placement!r}"
            )
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
        return cls(model, config, layout, table, mesh, poison_bubbles)

    def jit(self, fn, **kwargs):
        """`jax.jit(fn, **kwargs)` with the XLA options pipelined steps compile best with."""
        return jax.jit(fn, compiler_options=compiler_options(self.mesh.devices.flat), **kwargs)

    # -- parameters ----------------------------------------------------------------------------

    def init_params(self, key: jax.Array):
        """The params `model.init_params` makes from `key`, built directly in the pipeline
        layout (equal to `to_pipeline` of them); under `jit` with the param shardings as output
        shardings each device computes only its own shards."""
        params = M.init_arranged(self.model, key, self.layout.layer_index_SRJ)
        return M.pad_vocab(self.model, params, self.vocab_rows)

    @property
    def vocab_rows(self) -> int:
        """Vocabulary entries of the embedding and head in the pipeline layout: padded so they
        split evenly over `tensor` (`placement.vocab_rows`)."""
        return placement.vocab_rows(self.model.vocab_size, self.mesh.shape["tensor"])

    def to_pipeline(self, params):
        """Canonical params -> params whose blocks are in the `[S, R, J, ...]` view and whose
        vocabulary is padded to `vocab_rows` (also takes trees of their shape: AdamW moments)."""
        params = M.pad_vocab(self.model, params, self.vocab_rows)
        return {**params, "blocks": self.layout.to_pipeline(params["blocks"])}

    def to_canonical(self, params):
        params = M.unpad_vocab(self.model, params)
        return {**params, "blocks": self.layout.to_canonical(params["blocks"])}

    def param_shardings(self, params):
        """Where params are kept: blocks on `pipe` (stage axis) and `tensor` (Megatron split),
        and with `fsdp` on `data` too; see `placement.py`."""
        return placement.param_shardings(self.mesh, params, self.model, fsdp=self.config.fsdp)

    def gather(self, params):
        """Params as the stages compute with them: with `fsdp`, each stage's blocks gathered
        over `data` once here, before the tick loop (their gradient is reduce-scattered back);
        otherwise params unchanged."""
        if not self.config.fsdp:
            return params
        sh = placement.param_shardings(self.mesh, params, self.model)
        return jax.lax.with_sharding_constraint(params, sh)

    def batch_sharding(self):
        return placement.batch_sharding(self.mesh)

    def place(self, params):
        """Canonical params -> pipeline-layout params placed on the mesh."""
        pipe = jax.jit(self.to_pipeline)(params)
        return jax.device_put(pipe, self.param_shardings(pipe))

    # -- forward -------------------------------------------------------------------------------

    def microbatch(self, x_BTD):
        """[B, ...] -> [M, B/M, ...]; row b goes to micro-batch b mod M (data shards stay local)."""
        Mb = self.config.num_microbatches
        B = x_BTD.shape[0]
        self.config.check_batch(B)
        return x_BTD.reshape(B // Mb, Mb, *x_BTD.shape[1:]).swapaxes(0, 1)

    def unmicrobatch(self, x_MBTD):
        x = x_MBTD.swapaxes(0, 1)
        return x.reshape(-1, *x.shape[2:])

    def blocks_forward(self, blocks_SRJ, x_BTD):
        """Runs the whole block stack, pipelined, on activations of shape [B, T, D]."""
        y_MBTD = self.microbatches_forward(blocks_SRJ, self.microbatch(x_BTD))
        return self.unmicrobatch(y_MBTD.astype(x_BTD.dtype))

    def embed(self, embed_params, tokens_BT):
        """Embedded micro-batches [M, B/M, T, D], one micro-batch at a time: the embedding's
        float32 lookups and, in the backward, the float32 gradient it scatters into the table
        exist for one micro-batch at once, never for the whole batch."""
        one = lambda t: M.embed_apply(self.model, {"embed": embed_params}, t)
        return jax.lax.map(one, self.microbatch(tokens_BT))

    def microbatches_forward(self, blocks_SRJ, x_MBTD):
        """Runs the whole block stack, pipelined, on micro-batches [M, B/M, T, D].

        The ring runs virtual stages in the "loop" placement; a "vee" layout's blocks (zbv) are
        permuted to it first (`StageLayout.to_loop`)."""
        # The input is the same on every stage; its gradient is then summed over `pipe`. With
        # one stage that sum over a size-1 axis breaks XLA's partitioner when the batch is
        # split over `data`, so a single stage takes the input as its own (a size-1 split).
        x_spec = P("pipe") if self.config.num_stages == 1 else P()
        y_SMBTD = jax.shard_map(
            self._stage_program,
            mesh=self.mesh,
            in_specs=(P("pipe"), x_spec),
            out_specs=P("pipe"),
            axis_names={"pipe"},
        )(self.layout.to_loop(blocks_SRJ), x_MBTD)
        return y_SMBTD[0]

    def logits(self, params, tokens_BT):
        """Vocabulary logits [B, T, V] with blocks pipelined; params in the pipeline layout."""
        params = self.gather(params)
        x_BTD = M.embed_apply(self.model, params, tokens_BT)
        x_BTD = self.blocks_forward(params["blocks"], x_BTD)
        return M.head_apply(self.model, params, x_BTD)[..., : self.model.vocab_size]

    def loss(self, params, tokens_BT1):
        """Next-token loss on tokens [B, T+1]; params in the pipeline layout."""
        params = self.gather(params)
        if self.config.embed_head == "outside":
            x_MBTD = self.embed(params["embed"], tokens_BT1[:, :-1])
            y_MBTD = self.microbatches_forward(params["blocks"], x_MBTD).astype(x_MBTD.dtype)
            return self.head_loss(params, y_MBTD, self.microbatch(tokens_BT1[:, 1:]))
        if tokens_BT1.shape[1] - 1 > self.model.max_seq_len:
            M.embed_apply(self.model, params, tokens_BT1[:1, :-1])  # raises the length error
        outer = {k: v for k, v in params.items() if k != "blocks"}
        return jax.shard_map(
            self._stage_program,
            mesh=self.mesh,
            in_specs=(P("pipe"), None, P(), P()),
            out_specs=P(),
            axis_names={"pipe"},
        )(self.layout.to_loop(params["blocks"]), None, outer, self.microbatch(tokens_BT1))

    def head_loss(self, params, y_MBTD, targets_MBT):
        """Mean head + loss over micro-batches [M, B/M, ...], one at a time under
        `jax.checkpoint`: only one micro-batch's logits [B/M, T, V] are ever alive, forward or
        backward."""
        one = jax.checkpoint(lambda y, t: M.head_loss(self.model, params, y, t))
        return jnp.mean(jax.lax.map(lambda yt: one(*yt), (y_MBTD, targets_MBT)))

    def value_and_grad(self, params, tokens_BT1):
        """(loss, grads) with grads in the same pipeline layout as params."""
        if self.table.explicit_backward:
            return onef1b.value_and_grad(self, self.gather(params), tokens_BT1)
        return jax.value_and_grad(self.loss)(params, tokens_BT1)

    # -- the per-stage program -----------------------------------------------------------------

    def _units(self):
        """(weights, unit, active, units_per_tick): what one iteration of the tick loop runs.

        Without stage remat the unit is one layer slot and a tick is `J` iterations, so the loop
        runs flat over (tick, slot): under autodiff each layer's residuals go straight into the
        loop's one stack (a layer scan nested in the tick loop stacks them per tick, then the
        tick loop copies that stack again: about 20% of a step on CPU). With remat="stage" the
        unit is the whole stage under one checkpoint, so only stage inputs are saved.
        `unit(weights(w_RJ, r, j), count, h)` runs where `active(busy, j, count)` holds; padded
        slots and idle ticks do not run it. `active` is None when nothing is ever skipped (one
        stage, even layers): no conditional then, as its residual outputs would cost a copy per
        iteration. The weights are sliced outside the conditional, so the backward's weight
        gradient per iteration is one unit's, not the whole stack's.
        """
        idle_ticks = not self.forward_table.busy.all()
        J, J0 = self.layout.slots, min(self.layout.layer_counts)
        cfg, remat = self.model, self.config.remat
        # Under remat `_UNIT_POLICY` recomputes the unit whole: its blocks stay plain.
        layer = M.block_fn(cfg, "none" if remat == "none" else "stage")
        if remat != "stage":
            weights = lambda w_RJ, r, j: jax.tree.map(lambda a: a[r, j], w_RJ)
            unit = lambda p, count, h: layer(p, h)
            active = lambda busy, j, count: busy & (j < count)
            return weights, unit, active if idle_ticks or J0 < J else None, J

        # Slots below the smallest virtual stage's count always hold a layer and run
        # unconditionally; only the slots above it may be padding and sit behind a predicate.
        @jax.checkpoint
        def run_stage(w_J, count, h):
            full = lambda h, p: (layer(p, h), None)
            h = jax.lax.scan(full, h, jax.tree.map(lambda a: a[:J0], w_J))[0]
            if J == J0:
                return h

            def maybe(h, j_p):
                j, p = j_p
                return jax.lax.cond(j < count, lambda h: layer(p, h), lambda h: h, h), None

            tail = (jnp.arange(J0, J), jax.tree.map(lambda a: a[J0:], w_J))
            return jax.lax.scan(maybe, h, tail)[0]

        weights = lambda w_RJ, r, j: jax.tree.map(lambda a: a[r], w_RJ)
        return weights, run_stage, (lambda busy, j, count: busy) if idle_ticks else None, 1

    def _stage_program(self, w_1RJ, x_MBTD, outer=None, tokens_MBT1=None):
        """The ring program. With `outer` (embedding + head params) and `tokens_MBT1`, stage 0
        embeds each micro-batch as it enters and the last stage applies the head and the loss
        as it leaves; the program then returns the mean loss instead of the activations."""
        tab = self.forward_table
        cfg, S, R, T = self.model, self.config.num_stages, self.config.num_repeats, tab.num_ticks
        inside = outer is not None
        act_dtype = jnp.dtype(cfg.dtype) if inside else x_MBTD.dtype
        send_dtype = jnp.dtype(self.config.boundary_dtype or act_dtype)
        # What the last stage ran at tick t - hop is absorbed at stage 0 at tick t (t = 0..T).
        hop = tab.hop
        last_micro = np.maximum(tab.micro[:, S - 1], 0)
        arrive_micro = jnp.asarray(np.concatenate([np.zeros(hop, np.int32), last_micro]))
        arrive_ok = jnp.asarray(np.concatenate([np.zeros(hop, bool), tab.busy[:, S - 1]]))
        micro_TS = jnp.asarray(np.maximum(tab.micro, 0))
        repeat_TS = jnp.asarray(np.maximum(tab.repeat, 0))
        busy_TS = jnp.asarray(tab.busy)
        counts_SR = jnp.asarray(self.layout.looped().counts_SR)
        weights, unit, active, U = self._units()
        perm = [(i, (i + 1) % S) for i in range(S)]

        s = jax.lax.axis_index("pipe")
        w_RJ = jax.tree.map(lambda a: a[0], w_1RJ)
        if inside:
            # Make the replicated params per-stage values here, at top level: their gradient's
            # sum over stages must not sit inside a branch that only some stages take.
            outer = jax.tree.map(lambda a: jax.lax.pcast(a, "pipe", to="varying"), outer)
            Mb, B, T1 = tokens_MBT1.shape
            x_MBTD = jnp.zeros((Mb, B, T1 - 1, cfg.d_model), send_dtype)
        buf_MBTD = x_MBTD.astype(send_dtype)
        if inside or S > 1:  # else the input came in split over `pipe` (blocks_forward)
            buf_MBTD = jax.lax.pcast(buf_MBTD, "pipe", to="varying")
        fill = jnp.nan if self.poison_bubbles else 0.0
        recv_BTD = jnp.full_like(buf_MBTD[0], fill)
        # With the head inside, the last stage keeps each micro-batch's final output in `out`
        # and applies the head and the loss after the loop (`tail`), one micro-batch at a time:
        # inside the loop, autodiff would save the head's logits and weights every iteration.
        out = jnp.zeros_like(buf_MBTD, dtype=act_dtype) if inside else jnp.zeros((), act_dtype)

        def absorb(buf_MBTD, recv_BTD, t, now=True):
            m = arrive_micro[t]
            keep = _pick(now & (s == 0) & arrive_ok[t], recv_BTD, buf_MBTD[m])
            return jax.lax.dynamic_update_index_in_dim(buf_MBTD, keep, m, 0)

        def idle(busy, h):
            return jnp.where(busy, h, jnp.nan) if self.poison_bubbles else h

        def enter(m, r, busy, h_BTD):
            """Stage 0's input; with the embedding inside, repeat 0 embeds the tokens."""
            if not inside:
                return h_BTD
            # Under a checkpoint, the loop saves only the token ids for the embedding's backward.
            embed = jax.checkpoint(
                lambda _, ids: M.embed_apply(cfg, outer, ids).astype(act_dtype)
            )
            return jax.lax.cond(
                busy & (r == 0), embed, lambda h, _: h, h_BTD, tokens_MBT1[m, :, :-1]
            )

        def leave(m, r, busy, h_BTD, out_MBTD):
            """Keeps a micro-batch leaving the last stage for the last time (head inside)."""
            done = busy & (s == S - 1) & (r == R - 1)
            keep = _pick(done, h_BTD, out_MBTD[m])
            return jax.lax.dynamic_update_index_in_dim(out_MBTD, keep, m, 0)

        def tail(out_MBTD):
            """The mean loss, from the last stage (the others add zero)."""
            loss = lambda o: self.head_loss(outer, o, tokens_MBT1[:, :, 1:])
            zero = lambda o: jax.lax.pcast(jnp.zeros((), jnp.float32), "pipe", to="varying")
            return jax.lax.psum(jax.lax.cond(s == S - 1, loss, zero, out_MBTD), "pipe")

        def send(h_BTD):
            return jax.lax.ppermute(h_BTD.astype(send_dtype), "pipe", perm)

        @functools.partial(jax.checkpoint, policy=_UNIT_POLICY[self.config.remat])
        def run_unit(w_RJ, r, j, count, busy, h_BTD):
            """The unit on its slice of the stage's weights, which the backward slices again
            rather than stacking one copy per iteration; under remat, only `h_BTD` is saved."""
            p = M.compute_weights(cfg, weights(w_RJ, r, j))
            run = functools.partial(unit, checkpoint_name(p, "weights"), count)
            if active is None:
                return run(h_BTD)
            return jax.lax.cond(active(busy, j, count), run, functools.partial(idle, busy), h_BTD)

        def step(carry, i):
            """Unit j of tick t: the first one takes the stage input, the last one sends."""
            buf_MBTD, recv_BTD, h_BTD, out = carry
            t, j = i // U, i % U
            first, last = j == 0, j == U - 1
            buf_MBTD = absorb(buf_MBTD, recv_BTD, t, first)
            h_BTD, out = compute(buf_MBTD, recv_BTD, h_BTD, out, t, j)
            if U == 1:
                recv_BTD = send(h_BTD)
            else:  # the same branch on every stage, so the collective stays matched
                recv_BTD = jax.lax.cond(last, send, lambda _: recv_BTD, h_BTD)
            return (buf_MBTD, recv_BTD, h_BTD, out), None

        def compute(buf_MBTD, recv_BTD, h_BTD, out, t, j):
            """Unit j of tick t on the stage input (at j = 0) or on the previous unit's output."""
            first, last = j == 0, j == U - 1
            m, r, busy = micro_TS[t, s], repeat_TS[t, s], busy_TS[t, s]
            h_in = _pick(s == 0, enter(m, r, busy & first, buf_MBTD[m].astype(act_dtype)),
                         recv_BTD)
            h_BTD = _pick(first, h_in.astype(act_dtype), h_BTD) if U > 1 else h_in
            h_BTD = placement.constrain_activation(h_BTD.astype(act_dtype))
            h_BTD = run_unit(w_RJ, r, j, counts_SR[s, r], busy, h_BTD)
            if inside:
                out = leave(m, r, busy & last, h_BTD, out)
            return h_BTD, out

        # hop 2: the output of tick t - 1 (`out`) goes to the next stage during tick t, one
        # chunk of the sequence per unit, in a collective that no unit's compute waits for, so
        # the scheduler can overlap the two. It arrives in `nxt` and is the input of tick t + 1.
        chunk = -(-x_MBTD.shape[2] // U)  # sequence positions per unit (the last one padded)
        Tp = chunk * U

        def padded(h_BTD):
            return jnp.pad(h_BTD.astype(send_dtype), ((0, 0), (0, Tp - h_BTD.shape[1]), (0, 0)))

        def overlapped(carry, i):
            buf_MBTD, recv_BTD, nxt_BTD, out_BTD, h_BTD, out = carry
            t, j = i // U, i % U
            if U > 1:  # a new tick: what arrived is its input, the last output goes out
                recv_BTD = _pick(j == 0, nxt_BTD[:, : recv_BTD.shape[1]], recv_BTD)
                out_BTD = _pick(j == 0, padded(h_BTD), out_BTD)
            else:
                recv_BTD, out_BTD = nxt_BTD[:, : recv_BTD.shape[1]], padded(h_BTD)
            buf_MBTD = absorb(buf_MBTD, recv_BTD, t, j == 0)
            piece = jax.lax.dynamic_slice_in_dim(out_BTD, j * chunk, chunk, axis=1)
            got = jax.lax.ppermute(piece, "pipe", perm)
            nxt_BTD = jax.lax.dynamic_update_slice_in_dim(nxt_BTD, got, j * chunk, axis=1)
            h_BTD, out = compute(buf_MBTD, recv_BTD, h_BTD, out, t, j)
            return (buf_MBTD, recv_BTD, nxt_BTD, out_BTD, h_BTD, out), None

        h_BTD = jnp.zeros_like(recv_BTD, dtype=act_dtype)
        if hop == 1:
            carry = (buf_MBTD, recv_BTD, h_BTD, out)
            carry, _ = jax.lax.scan(step, carry, jnp.arange(T * U))
            buf_MBTD, recv_BTD, _, out = carry
        else:
            nxt_BTD = padded(recv_BTD)
            carry = (buf_MBTD, recv_BTD, nxt_BTD, jnp.zeros_like(nxt_BTD), h_BTD, out)
            carry, _ = jax.lax.scan(overlapped, carry, jnp.arange(T * U))
            buf_MBTD, _, nxt_BTD, _, h_BTD, out = carry
            if not inside:  # the last two ticks' outputs of the last stage are still out
                buf_MBTD = absorb(buf_MBTD, nxt_BTD[:, : recv_BTD.shape[1]], T)
                recv_BTD = send(h_BTD)
                T += 1
        if inside:
            return tail(out)
        return absorb(buf_MBTD, recv_BTD, T)[None]
