"""The forward + backward executor: runs any `full_table` (every schedule's training step, but
GPipe's and circular's with overlapped sends, which autodiff the ring table).

Every stage runs one `lax.scan` over the table's ticks. At a forward tick a stage runs its
group of layers under `jax.vjp` and stashes the residuals (minus the weights, which it still
holds) in a slot of a buffer sized by what is in flight, not by the micro-batch count; at a
backward tick it rebuilds the pullback from that slot and accumulates its weight gradients.
Activations go to the next stage with `ppermute`, gradients to the previous one with the reverse
`ppermute`, on the ticks after which some stage receives (`schedule.sends`); arrivals wait
in small inboxes (slots from `buffers.buffer_plan`). The head and the
loss run inside the last virtual stage's forward, so its backward has its loss gradient at
hand. With embed_head="outside" the embedding runs before the program; with "inside" the first
virtual stage embeds each micro-batch at its forward tick. The first virtual stage also adds the
lookups' gradient to the table's at its backward ticks (always inside; outside when the table
holds fewer elements than the batch's activations, `lookups_in_program`), else the program
returns its d(input) for the embedding's backward outside.
Idle ticks and padded slots are skipped with `lax.cond`, so they cost no FLOPs.

What runs is read off the table's op codes: in a table with W ops (split) a B tick computes only
the stage-input gradient (`backsplit.BackwardSplit`) and leaves what W needs from it (its carry)
in the stash, over the residuals only B read when that costs fewer bytes (`stash.Stash`); the W
tick turns that into the weight gradients, before the tick's sends (they send what comes out of
its conditional: a W left to run after the sends would land beside the next tick's op). A B whose
W is its stage's next op, with no value crossing between stages in between
(`schedule.fused_backward`: the first stage's pairs in ZB-H1 at S = 2, where they are a
stage's worth), runs with its W at its tick instead, W on the carry as B made it: the same work
before the same meeting point, without the stash round trip. Values move on the channel the
table names (`ScheduleTable.channel`): to the next stage, the previous one, or kept on the stage
at the turn of a V (zbv), where virtual stage v sits on `table.virtual_stage`'s stage.

Config: remat="layer" runs each layer under `jax.checkpoint`, so a forward stashes only each
layer's input and the backward recomputes one layer at a time; remat="stage" stashes only each
stage input and recomputes the stage's forward in its backward. Activations and gradients that
cross to another stage travel in `boundary_dtype` (values kept on a stage at the turn of a V do
not cross). `Pipeline.poison_bubbles` is not used here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxpipe import model as M
from jaxpipe import placement
from jaxpipe.backsplit import BackwardSplit
from jaxpipe.buffers import buffer_plan
from jaxpipe.schedule import BWD, FWD, NEXT, PREV, SELF, WGT, fused_backward, sends
from jaxpipe.stash import Stash

_tree = jax.tree.map


_UNROLL_MAX_SLOTS = 2  # stages with at most this many layer slots run them unrolled


def _without_weights(pull, weights):
    """A pullback's residual leaves split from the weights it holds: ((treedef, weight position
    or -1 per leaf), the leaves that are not weights). Weights are told by identity: a residual
    leaf that is the very array passed in as a weight."""
    leaves, treedef = jax.tree.flatten(pull)
    index = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(weights))}
    where = tuple(index.get(id(leaf), -1) for leaf in leaves)
    return (treedef, where), [leaf for leaf, i in zip(leaves, where, strict=True) if i < 0]


def _with_weights(structure, weights, kept):
    """The pullback `_without_weights` split, rebuilt from the weights and the kept leaves."""
    treedef, where = structure
    w_leaves, kept = jax.tree.leaves(weights), iter(kept)
    return jax.tree.unflatten(treedef, [w_leaves[i] if i >= 0 else next(kept) for i in where])


def _zeros_like(shape: jax.ShapeDtypeStruct):
    """Zeros of `shape`'s shape and dtype, varying over the same manual mesh axes."""
    z = jnp.zeros(shape.shape, shape.dtype)
    manual = shape.manual_axis_type  # None outside shard_map
    axes = tuple(sorted(manual.varying)) if manual is not None else ()
    return jax.lax.pcast(z, axes, to="varying") if axes else z


def _skippable(layer):
    """`(p, h, active) -> layer(p, h) if active else h` for a layer slot that may be padding, with
    its own backward, so that what a forward keeps for it holds no copy of the weights.

    Under `jax.vjp` a `lax.cond` around the layer hands out its residuals as the conditional's
    outputs, the weights the backward reads among them: new values, which the stage's stash would
    then hold for every micro-batch in flight (a bfloat16 copy of the layer's weights each; at
    70B scale tens of GiB per device). Here the forward keeps the layer's residuals minus its
    weights (zeros when the slot is padding), and the backward takes the weights back from its
    arguments, as `_StageVjp` does for the stage."""
    structure = {}  # the layer's pullback, as `_without_weights` splits it

    def run(p, h):
        y, pull = jax.vjp(layer, p, h)
        structure["pull"], kept = _without_weights(pull, p)
        return y, kept

    @jax.custom_vjp
    def skippable(p, h, active):
        return jax.lax.cond(active, layer, lambda p, h: h, p, h)

    def fwd(p, h, active):
        shapes = jax.eval_shape(run, p, h)[1]
        skip = lambda p, h: (h, [_zeros_like(a) for a in shapes])  # noqa: E731
        y, kept = jax.lax.cond(active, run, skip, p, h)
        return y, (p, kept, active)

    def bwd(res, dy):
        p, kept, active = res

        def back(p, kept, dy):
            return _with_weights(structure["pull"], p, kept)(dy)

        def through(p, kept, dy):
            return _tree(jnp.zeros_like, p), dy

        dp, dh = jax.lax.cond(active, back, through, p, kept, dy)
        return dp, dh, None

    skippable.defvjp(fwd, bwd)
    return skippable


class _StageVjp:
    """One stage's group of J layer slots, forward with residuals and backward from them.

    Residual leaves that are the weights themselves are not stashed: the backward passes the
    stage's weights back in. When every virtual stage has J layers the slots run as one
    `lax.scan` over the stacked weights (autodiff hands the scanned weights to the backward as
    the same arrays, and compile time does not grow with J). Uneven layouts unroll the slots,
    the padded ones behind a conditional with a backward of its own (`_skippable`), whose
    residuals leave the weights out as well. With `recompute`, only the stage input is
    stashed and the backward runs the forward again.
    """

    def __init__(self, cfg, num_slots: int, min_count: int, remat: str = "none", split=False):
        self.cfg, self.J, self.min_count = cfg, num_slots, min_count
        self.remat, self.recompute = remat, remat == "stage"
        # A split backward cuts the backward's program apart between equations; a scan over
        # the layers would be one equation, so split stages unroll their layers. Stages of a
        # few slots unroll them too: a scan stacks its residuals per layer, which costs a copy
        # of them every forward (with J = 2, about 10 % of a 1F1B step of `small` on CPU).
        self.scanned = min_count == num_slots and not split and num_slots > _UNROLL_MAX_SLOTS
        self.meta = None  # (treedef, weight position or -1 per residual leaf)
        self.split = None  # backsplit.BackwardSplit, built on the first `input_grad`

    def layers(self, w, count, h):
        layer = M.block_fn(self.cfg, self.remat)
        if self.scanned:
            return jax.lax.scan(lambda h, p: (layer(p, h), None), h, w)[0]
        skippable = _skippable(layer)
        for j, p in enumerate(w):
            h = layer(p, h) if j < self.min_count else skippable(p, h, j < count)
        return h

    def weights(self, w_J):
        """What `layers` takes: the stacked weights, or one tree per slot when unrolled."""
        if self.scanned:
            return w_J
        return [_tree(lambda a, j=j: a[j], w_J) for j in range(self.J)]

    def forward(self, w_J, count, h):
        w = self.weights(w_J)
        if self.recompute:
            return self.layers(w, count, h), [h]
        y, pull = jax.vjp(lambda w, h: self.layers(w, count, h), w, h)
        meta, kept = _without_weights(pull, w)
        if self.meta is not None and self.meta[1] != meta[1]:
            raise AssertionError("stage residual structure changed between traces")
        self.meta = meta
        return y, kept

    def input_grad(self, w_J, count, kept, dy):
        """B of a split backward: (d(stage input), what W needs that B computed)."""
        if self.split is None:
            self.split = BackwardSplit(
                lambda free, kept, dy: self.backward(*free, kept, dy), (w_J, count), kept, dy
            )
        return self.split.input_grad((w_J, count), kept, dy)

    def weight_grad(self, w_J, count, kept_w, carry):
        """W of a split backward: the stage's weight gradients, from the stashed leaves at
        `self.split.w_stashed` and B's `carry`."""
        return self.split.weight_grad((w_J, count), kept_w, carry)

    def backward(self, w_J, count, kept, dy):
        if self.recompute:
            pull = jax.vjp(lambda w, h: self.layers(w, count, h), self.weights(w_J), kept[0])[1]
        else:
            pull = _with_weights(self.meta, self.weights(w_J), kept)
        dw, dh = pull(dy)
        return (dw if self.scanned else _tree(lambda *a: jnp.stack(a), *dw)), dh


# Platforms whose compilers update a buffer in place through two conditionals of one tick (TPU's
# own copy insertion; CPU's with the region analysis `Pipeline.jit` turns on).
PAIRED_PLATFORMS = ("cpu", "tpu")


def _pairs_stay_in_place(mesh) -> bool:
    return {d.platform for d in mesh.devices.flat} <= set(PAIRED_PLATFORMS)


def _varying(a):
    """Marks a value as differing across `pipe` (needed for carries that ppermute feeds)."""
    return a if "pipe" in jax.typeof(a).mat.varying else jax.lax.pcast(a, "pipe", to="varying")


def lookups_in_program(pipe, embed_params, inputs_BT) -> bool:
    """Whether the program makes the embedding lookups' gradient itself (the first virtual stage,
    at each of its backward ticks) and sums it over `pipe` with the head's; otherwise it returns
    the first stage's d(input) [M, B/M, T, D] for the embedding's backward outside.

    The table is the same on every stage, so its gradient must reach them all: either as the
    d(input) (the batch's activations, summed over `pipe` from the one stage that has them) or
    as the table's gradient. Always so with the embedding inside; outside, whichever of the two
    holds fewer elements per device (the table's vocabulary split over `tensor`, the batch over
    `data`): the table for pre-training batches, the d(input) for a small fine-tuning batch
    against a large vocabulary.
    """
    if pipe.config.embed_head == "inside":
        return True
    tensor, data = pipe.mesh.shape["tensor"], pipe.mesh.shape["data"]
    split = placement.vocab_split(embed_params["tok"].shape[0], tensor)
    table = sum(
        a.size // (tensor if split and path[-1].key == "tok" else 1)
        for path, a in jax.tree_util.tree_leaves_with_path(embed_params)
    )
    return table < inputs_BT.size // data * pipe.model.d_model


def value_and_grad(pipe, params, tokens_BT1):
    """(loss, grads) of `pipe` (a `Pipeline` with a forward + backward table); grads in the
    pipeline layout of params. Equal to `jax.value_and_grad(pipe.loss)` up to float rounding."""
    inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
    inside = pipe.config.embed_head == "inside"
    lookups = lookups_in_program(pipe, params["embed"], inputs_BT)
    t_MBT = pipe.microbatch(targets_BT)
    ids_MBT = pipe.microbatch(inputs_BT)
    # The head reads the token table only when tied to it: an untied head's program does not
    # carry the table (nor accumulate a zero gradient for it). With the embedding inside, the
    # first virtual stage looks its micro-batches up itself and the program carries the table;
    # so it does when it makes the lookups' gradient.
    head_params = {"head": params["head"]}
    if pipe.model.tied or lookups:
        head_params["embed"] = params["embed"]
    if inside:
        x_in = None  # the first virtual stage looks its micro-batches up itself
    elif lookups:
        x_in = pipe.embed(params["embed"], inputs_BT)
    else:
        x_in, embed_vjp = jax.vjp(lambda e: pipe.embed(e, inputs_BT), params["embed"])
    # Sums over `pipe` (the loss, the head's gradient); one stage returns its own instead
    # (`_pipe_sum`), stacked over the size-1 axis.
    summed = P("pipe") if pipe.config.num_stages == 1 else P()
    program = jax.shard_map(
        lambda w, hp, x, ids, t: _stage_program(pipe, w, hp, x, ids, t, lookups),
        mesh=pipe.mesh,
        in_specs=(P("pipe"), P(), P(), P(), P()),
        out_specs=(summed, P("pipe"), summed) + (() if lookups else (P("pipe"),)),
        axis_names={"pipe"},
    )
    loss, g_blocks, g_head, *dx_SMBTD = program(
        params["blocks"], head_params, x_in, ids_MBT, t_MBT
    )
    if pipe.config.num_stages == 1:
        loss, g_head = _tree(lambda a: a[0], (loss, g_head))
    if lookups:
        g_embed = g_head["embed"]  # the lookups' gradient (and the tied head's), summed
    else:
        (g_embed,) = embed_vjp(dx_SMBTD[0][0].astype(x_in.dtype))
        if pipe.model.tied:
            g_embed = _tree(jnp.add, g_embed, g_head["embed"])
    return loss, {"embed": g_embed, "blocks": g_blocks, "head": g_head["head"]}


def _pipe_sum(S: int):
    """Sum over `pipe`; with one stage, the stage's own value stacked over the size-1 axis (a
    sum over it, with the batch split over `data`, breaks XLA's SPMD partitioner)."""
    return (lambda a: a[None]) if S == 1 else (lambda a: jax.lax.psum(a, "pipe"))


def _stage_program(pipe, w_1RJ, head_params, x_in, ids_MBT, t_MBT, lookups):
    """One stage's tick loop. `x_in` is the embedded micro-batches [M, B/M, T, D] (None with the
    embedding inside), `ids_MBT` their token ids [M, B/M, T]. With `lookups`, the first virtual
    stage adds the embedding lookups' gradient to the table's (`lookups_in_program`)."""
    cfg, tab, layout = pipe.model, pipe.table, pipe.layout
    inside = pipe.config.embed_head == "inside"
    S, Mb, V = tab.num_stages, tab.num_microbatches, tab.num_stages * tab.num_repeats
    plan = buffer_plan(tab)
    c = lambda a: jnp.asarray(np.maximum(a, 0))
    op_TS, micro_TS, repeat_TS = jnp.asarray(tab.op), c(tab.micro), c(tab.repeat)
    # Channels a value arrives on (NEXT: from the stage before on the ring, PREV: from the
    # stage after, SELF: kept from this stage's previous tick); unused ones cost nothing.
    act_chs = [ch for ch in (NEXT, PREV, SELF) if (plan.act_write[ch] >= 0).any()]
    grad_chs = [ch for ch in (NEXT, PREV, SELF) if (plan.grad_write[ch] >= 0).any()]
    act_w, grad_w = c(plan.act_write), c(plan.grad_write)
    act_w_ok, grad_w_ok = jnp.asarray(plan.act_write >= 0), jnp.asarray(plan.grad_write >= 0)
    act_r, grad_r = c(plan.act_read), c(plan.grad_read)
    head_w = c(plan.head_write)
    slots_TS = {"res": c(plan.res_slot), "wres": c(plan.wres_slot), "carry": c(plan.carry_slot)}
    counts_SR = jnp.asarray(layout.counts_SR)
    fused = fused_backward(tab)  # B and W cells run as one backward at the B's tick
    fused_TS = jnp.asarray(fused)
    stage = _StageVjp(cfg, layout.slots, min(layout.layer_counts), pipe.config.remat, tab.split)
    vary = lambda tree: _tree(_varying, tree)

    s = jax.lax.axis_index("pipe")
    # The stage computes with its weights cast once per step: a cast inside a forward would be
    # a residual of every micro-batch, and the stash would hold one copy of the stage's weights
    # in the compute dtype per slot. Weight gradients come back in that dtype (as the matmuls
    # make them) and accumulate in the parameters' own.
    w_RJ = M.compute_weights(cfg, _tree(lambda a: a[0], w_1RJ))
    hp = vary(head_params)
    x_in = vary(x_in)
    zero_BTD = _varying(jnp.zeros(ids_MBT.shape[1:] + (cfg.d_model,), jnp.dtype(cfg.dtype)))
    w_J0, count0 = _tree(lambda a: a[0], w_RJ), _varying(counts_SR[s, 0])
    res_shapes = jax.eval_shape(lambda w, n, h: stage.forward(w, n, h)[1], w_J0, count0, zero_BTD)
    zeros_res = [jnp.zeros(r.shape, r.dtype) for r in res_shapes]
    carry_shapes, w_kept, near = [], (), ()
    if tab.split:
        carry_shapes = jax.eval_shape(
            lambda *a: stage.input_grad(*a)[1], w_J0, count0, vary(zeros_res), zero_BTD
        )
        w_kept, near = stage.split.w_stashed, stage.split.carry_near
    pair = _pairs_stay_in_place(pipe.mesh)
    stash = Stash(plan, res_shapes, w_kept, carry_shapes, pair=pair, near=near)
    state = vary(
        {
            "act": jnp.zeros((plan.num_act,) + zero_BTD.shape, zero_BTD.dtype),
            "grad": jnp.zeros((plan.num_grad,) + zero_BTD.shape, zero_BTD.dtype),
            "stash": stash.zeros(),
            "g_w": _tree(lambda a: jnp.zeros(a.shape[1:], a.dtype), w_1RJ),
            "head": {"loss": jnp.zeros((), jnp.float32), "g": _tree(jnp.zeros_like, head_params)},
            "send_f": {ch: zero_BTD for ch in act_chs},
            "send_b": {ch: zero_BTD for ch in grad_chs},
        }
    )
    if not lookups:  # d(input) of each micro-batch, for the embedding's backward outside
        state["dx"] = vary(jnp.zeros(x_in.shape, zero_BTD.dtype))

    def head_loss(hp, y_BTD, t_BT):
        return M.head_loss(cfg, hp, y_BTD, t_BT) / Mb

    def embed(e, m):
        """Micro-batch m embedded (embedding inside: the first virtual stage's input)."""
        return M.embed_apply(cfg, {"embed": e}, ids_MBT[m]).astype(zero_BTD.dtype)

    def embed_grad(g_e, dh, m):
        """The lookups' gradient of micro-batch m, from d(input) of the first virtual stage."""
        (d_e,) = jax.vjp(lambda e: embed(e, m), hp["embed"])[1](dh)
        return _tree(jnp.add, g_e, d_e)

    # The stash is written in place by the forward's branch and the carries by B's; the idle
    # branches pass them through untouched, so a tick that stashes nothing moves no bytes of
    # them. Every read of a buffer takes the version the tick's write produced (a stage runs
    # one op a tick, so that is the one its op needs): a conditional that wrote a buffer some
    # other conditional still read in its old version would make XLA copy the buffer whole.
    def fwd(head, bufs, k, w_J, count, h, m, first, last):
        if inside:
            h = jax.lax.cond(first, lambda h: embed(hp["embed"], m), lambda h: h, h)
            h = placement.constrain_activation(h)
        y, kept = stage.forward(w_J, count, h)

        def with_head(head):
            loss, (g_hp, dy) = jax.value_and_grad(head_loss, argnums=(0, 1))(hp, y, t_MBT[m])
            return {"loss": head["loss"] + loss, "g": _tree(jnp.add, head["g"], g_hp)}, dy

        head, dy = jax.lax.cond(last, with_head, lambda head: (head, zero_BTD), head)
        # Residuals that are the same on every stage (constants a kernel closes over, such as
        # splash attention's block tables) are typed as varying, like the stash they go to.
        return head, y, stash.write_forward(bufs, vary(kept), k), dy

    def no_fwd(head, bufs, k, *_):
        return head, zero_BTD, bufs, zero_BTD

    def b_input(w_J, count, bufs, k, dy):
        dh, carry = stage.input_grad(w_J, count, stash.read_backward(bufs, k), dy)
        return dh, stash.write_carry(bufs, carry, k)

    def no_b_input(w_J, count, bufs, k, dy):
        return zero_BTD, bufs

    def add_grads(g_w, dw_J, r):
        def add(g, d):
            return jax.lax.dynamic_update_index_in_dim(g, g[r] + d.astype(g.dtype), r, 0)

        return _tree(add, g_w, dw_J)

    def bwd(g_w, w_J, count, bufs, k, dy, r):
        dw_J, dh = stage.backward(w_J, count, stash.read_backward(bufs, k), dy)
        return add_grads(g_w, dw_J, r), dh

    def b_then_w(g_w, w_J, count, bufs, k, dy, r):
        """A fused pair: B, then W on B's carry as B left it (not through the stash). The barrier
        keeps W's weight gradients from being made while B's intermediates are alive, so the
        pair peaks at B's or W's temporaries, not at the fused backward's."""
        kept = stash.read_backward(bufs, k)
        dh, carry = stage.input_grad(w_J, count, kept, dy)
        kept_w = [kept[i] for i in stage.split.w_stashed]
        dh, kept_w, carry = jax.lax.optimization_barrier((dh, kept_w, carry))
        return add_grads(g_w, stage.weight_grad(w_J, count, kept_w, carry), r), dh

    def no_bwd(g_w, *_):
        return g_w, zero_BTD

    def wgt(g_w, w_J, count, bufs, k, r, y, dh):
        kept_w, carry = stash.read_weight(bufs, k)
        g_w = add_grads(g_w, stage.weight_grad(w_J, count, kept_w, carry), r)
        return g_w, jnp.zeros_like(y), jnp.zeros_like(dh)

    def put(buf, x, slot, ok):
        return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(ok, x, buf[slot]), slot, 0)

    perms = {
        NEXT: [(i, (i + 1) % S) for i in range(S)],
        PREV: [((i + 1) % S, i) for i in range(S)],
    }

    wire = jnp.dtype(pipe.config.boundary_dtype or zero_BTD.dtype)

    # Ticks after which no stage receives on a channel skip its ppermute.
    outs = sends(tab)
    sends_f, sends_b = outs[FWD], outs[BWD]
    needs_f = {ch: jnp.asarray(sends_f[ch]) for ch in act_chs}
    needs_b = {ch: jnp.asarray(sends_b[ch]) for ch in grad_chs}

    def send(y, needs, t):
        """y to each channel that a stage reads at the next tick; what crosses to another stage
        travels in `boundary_dtype`."""

        def hop(y, ch):
            return jax.lax.ppermute(y.astype(wire), "pipe", perms[ch]).astype(y.dtype)

        return {
            ch: y if ch == SELF else jax.lax.cond(
                need[t], functools.partial(hop, ch=ch), lambda y: y, y
            )
            for ch, need in needs.items()
        }

    def tick(st, t):
        act, grad = st["act"], st["grad"]
        for ch in act_chs:
            act = put(act, st["send_f"][ch], act_w[ch, t, s], act_w_ok[ch, t, s])
        for ch in grad_chs:
            grad = put(grad, st["send_b"][ch], grad_w[ch, t, s], grad_w_ok[ch, t, s])
        op, m, r = op_TS[t, s], micro_TS[t, s], repeat_TS[t, s]
        k = {kind: a[t, s] for kind, a in slots_TS.items()}
        v, count = tab.virtual_stage(s, r), counts_SR[s, r]
        w_J = _tree(lambda a: a[r], w_RJ)
        is_f, is_b = op == FWD, op == BWD

        # Batch on `data` inside the stage (the executor is manual over `pipe` only).
        h = act[act_r[t, s]] if inside else jnp.where(v == 0, x_in[m], act[act_r[t, s]])
        h = placement.constrain_activation(h)
        dy_in = placement.constrain_activation(grad[grad_r[t, s]])
        head, y, bufs, dy = jax.lax.cond(
            is_f, fwd, no_fwd, st["head"], st["stash"], k, w_J, count, h, m, v == 0, v == V - 1
        )
        if tab.split:  # B leaves the weight gradients alone: they do not pass its conditional
            paired = fused_TS[t, s]
            dh, bufs = jax.lax.cond(
                is_b & ~paired, b_input, no_b_input, w_J, count, bufs, k, dy_in
            )
            g_w = st["g_w"]
            if fused.any():  # the pair's W runs at its B's tick: no carry written or read back
                g_w, dh = jax.lax.cond(
                    is_b & paired, lambda g_w, dh, *a: b_then_w(g_w, *a),
                    lambda g_w, dh, *a: (g_w, dh), g_w, dh, w_J, count, bufs, k, dy_in, r,
                )
            # The tick's W finishes before its sends, as in the table: a W run after them lands
            # beside the next tick's op while the other stages wait at the next send. So what
            # the tick sends comes out of W's conditional (zeros at a W tick, where the stage ran
            # no F or B; passed through otherwise), and the sends wait for it. An optimization
            # barrier does not order them on a runtime that runs whatever is ready (XLA's CPU).
            g_w, y, dh = jax.lax.cond(
                (op == WGT) & ~paired, wgt, lambda g_w, *a: (g_w, *a[-2:]), g_w, w_J, count,
                bufs, k, r, y, dh,
            )
        else:
            g_w, dh = jax.lax.cond(is_b, bwd, no_bwd, st["g_w"], w_J, count, bufs, k, dy_in, r)
        new = {
            "act": act,
            "grad": put(grad, dy, head_w[t, s], is_f & (v == V - 1)),
            "stash": bufs,
            "head": head,
            "send_f": send(y, needs_f, t),
            "send_b": send(dh, needs_b, t),
        }
        if lookups:
            g_e = jax.lax.cond(
                is_b & (v == 0), embed_grad, lambda g_e, *_: g_e, head["g"]["embed"], dh, m
            )
            new["head"] = {**head, "g": {**head["g"], "embed": g_e}}
        else:
            new["dx"] = put(st["dx"], dh, m, is_b & (v == 0))
        return {**new, "g_w": g_w}, None

    st, _ = jax.lax.scan(tick, state, jnp.arange(tab.num_ticks))
    g_head = _tree(_pipe_sum(S), st["head"]["g"])
    g_w = _tree(lambda g: g[None], st["g_w"])
    out = _pipe_sum(S)(st["head"]["loss"]), g_w, g_head
    return out if lookups else (*out, st["dx"][None])
