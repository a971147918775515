"""The forward + backward executor against the unpipelined reference (loss and every gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import needs_devices

from jaxpipe import model as M
from jaxpipe import onef1b
from jaxpipe.config import ConfigError, PipelineConfig, get_preset
from jaxpipe.layout import StageLayout
from jaxpipe.mesh import make_mesh
from jaxpipe.onef1b import _StageVjp
from jaxpipe.pipeline import Pipeline
from jaxpipe.schedule import fused_backward

SEQ = 8


def _check(schedule, S, Mb, R=1, style="tiny", layers=None, layout=None, data=1, remat="none",
           vocab=None, **kw):
    cfg = get_preset(style, num_layers=layers or 2 * S * R, max_seq_len=SEQ, vocab_size=vocab)
    pcfg = PipelineConfig(
        num_stages=S,
        num_microbatches=Mb,
        num_repeats=R,
        schedule=schedule,
        data_parallel=data,
        remat=remat,
        **kw,
    )
    mesh = make_mesh(pcfg, jax.devices()[: S * data * pcfg.tensor_parallel])
    pipe = Pipeline.create(cfg, pcfg, mesh, layout)
    params = jax.jit(M.init_params, static_argnums=(0, 1))(cfg, 3)
    tokens = jax.random.randint(jax.random.key(7), (2 * Mb * data, SEQ + 1), 0, cfg.vocab_size)
    loss, grads = pipe.jit(pipe.value_and_grad)(pipe.place(params), tokens)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: M.reference_loss(cfg, p, tokens)))(
        params
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    # Forward-only entry points (eval, sampling) run the same layers in the same order.
    np.testing.assert_allclose(jax.jit(pipe.loss)(pipe.place(params), tokens), ref_loss, rtol=1e-5)
    got = pipe.to_canonical(grads)
    for path, want in jax.tree_util.tree_leaves_with_path(ref_grads):
        have = dict(jax.tree_util.tree_leaves_with_path(got))[path]
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5, err_msg=str(path))
    return pipe, grads


def test_layer_order_is_observable():
    """Swapping two layers' weights changes the reference loss, so a misordered run would fail."""
    cfg = get_preset("tiny", num_layers=4, max_seq_len=SEQ)
    params = jax.jit(M.init_params, static_argnums=(0, 1))(cfg, 3)
    tokens = jax.random.randint(jax.random.key(7), (4, SEQ + 1), 0, cfg.vocab_size)
    swapped = {
        **params,
        "blocks": jax.tree.map(lambda a: a[jnp.array([0, 2, 1, 3])], params["blocks"]),
    }
    loss = jax.jit(lambda p: M.reference_loss(cfg, p, tokens))
    assert abs(loss(params) - loss(swapped)) > 1e-4


@needs_devices(4)
@pytest.mark.parametrize("schedule", ["1f1b", "zb_h1"])
def test_the_stash_stays_in_place_without_region_analysis(schedule, monkeypatch):
    """Without carries paired with residuals (as on GPU), the tick loop updates its stash in
    place under XLA's generic copy insertion (GPU's) as under `Pipeline.jit`'s CPU region
    analysis: plain `jax.jit` makes at most a few more copies (a conditional that wrote a
    buffer another one still read in its old version made 24 more in 1f1b, 44 in zb_h1; pairs
    made 15 more in zb_h1), and the two agree."""
    monkeypatch.setattr(onef1b, "PAIRED_PLATFORMS", ())
    cfg = get_preset("tiny", num_layers=4, max_seq_len=SEQ)
    pcfg = PipelineConfig(num_stages=4, num_microbatches=8, schedule=schedule)
    pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[:4]))
    params = pipe.place(jax.jit(M.init_params, static_argnums=(0, 1))(cfg, 3))
    tokens = jax.random.randint(jax.random.key(7), (16, SEQ + 1), 0, cfg.vocab_size)
    plain = jax.jit(pipe.value_and_grad).lower(params, tokens).compile()
    tuned = pipe.jit(pipe.value_and_grad).lower(params, tokens).compile()
    copies = lambda c: c.as_text().count(" copy(")
    assert copies(plain) <= copies(tuned) + 8, (copies(plain), copies(tuned))
    (loss_p, g_p), (loss_t, g_t) = plain(params, tokens), tuned(params, tokens)
    np.testing.assert_allclose(loss_t, loss_p, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_t), jax.tree.leaves(g_p), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@needs_devices(2)
def test_1f1b_two_stages_gpt2():
    pipe, grads = _check("1f1b", 2, 4)
    assert pipe.table.name == "1f1b"
    leaf = jax.tree.leaves(grads["blocks"])[0]
    assert leaf.sharding.spec[0] == "pipe"


@needs_devices(3)
def test_interleaved_three_stages_two_repeats_llama():
    _check("interleaved_1f1b", 3, 3, R=2, style="tiny-llama", layers=6)


@pytest.mark.slow
@needs_devices(4)
def test_1f1b_uneven_layout_data_and_pipe():
    """data=2 x pipe=2, stages of 1 and 3 layers (padded slots), 3 micro-batches."""
    _check("1f1b", 2, 3, layers=4, layout=StageLayout(2, 1, (1, 3)), data=2)


def test_interleaved_rejects_microbatches_not_multiple_of_stages():
    cfg = get_preset("tiny", num_layers=4, max_seq_len=SEQ)
    pcfg = PipelineConfig(
        num_stages=2, num_microbatches=3, num_repeats=2, schedule="interleaved_1f1b"
    )
    with pytest.raises(ConfigError, match="multiple of num_stages"):
        Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[:2]))


@pytest.mark.slow
@needs_devices(4)
@pytest.mark.parametrize(
    "schedule,S,Mb,R,style",
    [
        ("1f1b", 1, 1, 1, "tiny"),
        ("1f1b", 1, 3, 1, "tiny-llama"),
        ("1f1b", 4, 1, 1, "tiny"),
        ("1f1b", 4, 2, 1, "tiny-llama"),
        ("1f1b", 4, 4, 1, "tiny"),
        ("1f1b", 4, 8, 1, "tiny-llama"),
        ("1f1b", 4, 5, 1, "tiny"),
        ("1f1b", 2, 2, 1, "tiny-llama"),
        ("interleaved_1f1b", 2, 4, 2, "tiny"),
        ("interleaved_1f1b", 4, 4, 2, "tiny-llama"),
        ("interleaved_1f1b", 4, 8, 2, "tiny"),
        ("interleaved_1f1b", 3, 6, 2, "tiny"),
        ("interleaved_1f1b", 2, 2, 1, "tiny"),
    ],
)
def test_grid(schedule, S, Mb, R, style):
    _check(schedule, S, Mb, R, style=style, layers=S * R + (S > 1))


@pytest.mark.slow
@needs_devices(4)
def test_interleaved_uneven_layout():
    _check(
        "interleaved_1f1b",
        2,
        2,
        R=2,
        style="tiny-llama",
        layers=6,
        layout=StageLayout(2, 2, (1, 2, 2, 1)),
    )


@pytest.mark.slow
@needs_devices(2)
def test_1f1b_remat_recomputes_stage():
    _check("1f1b", 2, 4, remat="stage")


@pytest.mark.slow
@needs_devices(2)
def test_1f1b_temp_memory_below_gpipe():
    """1F1B stashes about S micro-batches of residuals where GPipe keeps all M."""
    cfg = get_preset("tiny", num_layers=2, max_seq_len=32)
    params = M.init_params(cfg, 0)
    tokens = jnp.zeros((16, 33), jnp.int32)
    temp = {}
    for schedule in ("gpipe", "1f1b"):
        pcfg = PipelineConfig(num_stages=2, num_microbatches=16, schedule=schedule)
        pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[:2]))
        compiled = jax.jit(pipe.value_and_grad).lower(pipe.place(params), tokens).compile()
        temp[schedule] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["1f1b"] < 0.5 * temp["gpipe"], temp


@pytest.mark.parametrize("counts", [(3, 3), (3, 2)])
def test_stage_stashes_no_weights_scanned_or_unrolled(counts):
    """Even layers run as one scan, uneven ones unrolled with the padded slots behind a
    conditional; neither stashes a weight (a padded slot's residuals leave its weights out)."""
    from jaxpipe.onef1b import _StageVjp

    cfg = get_preset("tiny", num_layers=max(counts))
    w_J = M.init_params(cfg, 0)["blocks"]
    stage = _StageVjp(cfg, max(counts), min(counts))
    assert stage.scanned == (min(counts) == max(counts))
    h = jnp.ones((2, SEQ, cfg.d_model))
    kept = jax.jit(lambda w, h: stage.forward(w, min(counts), h)[1])(w_J, h)
    assert any(i >= 0 for i in stage.meta[1])  # the backward does read weights...
    weight_shapes = {a.shape for a in jax.tree.leaves(w_J)}
    weight_shapes |= {a.shape[1:] for a in jax.tree.leaves(w_J)}
    assert not [k.shape for k in kept if k.shape in weight_shapes]  # ...but stashes none
    if max(counts) > min(counts):  # every slot, padded or not, keeps what one layer keeps
        one, w_1 = _StageVjp(cfg, 1, 1), jax.tree.map(lambda a: a[:1], w_J)
        per_layer = len(jax.eval_shape(lambda w, h: one.forward(w, 1, h)[1], w_1, h))
        assert len(kept) == max(counts) * per_layer
    jaxpr = str(jax.make_jaxpr(lambda w, h: stage.forward(w, min(counts), h))(w_J, h))
    assert ("scan[" in jaxpr) == stage.scanned


def test_layer_remat_stashes_only_layer_inputs():
    """remat="layer": a forward stashes each layer's input (J x [B, T, D]), not its internals
    (attention probabilities, MLP hidden units)."""
    from jaxpipe.onef1b import _StageVjp

    cfg = get_preset("tiny", num_layers=3)
    w_J = M.init_params(cfg, 0)["blocks"]
    h = jnp.ones((2, SEQ, cfg.d_model))
    stashed = {}
    for remat in ("none", "layer"):
        stage = _StageVjp(cfg, 3, 3, remat)
        kept = jax.jit(lambda w, h, stage=stage: stage.forward(w, 3, h)[1])(w_J, h)
        stashed[remat] = sum(k.size for k in kept)
    assert stashed["layer"] <= 3 * h.size < stashed["none"], stashed


@needs_devices(2)
def test_1f1b_layer_remat_matches_reference():
    _check("1f1b", 2, 4, remat="layer")


@needs_devices(2)
def test_zb_h1_layer_remat_matches_reference():
    """B opens each rematerialised layer: it recomputes, W takes the weight gradients."""
    _check("zb_h1", 2, 3, remat="layer")


# -- zero-bubble schedules (split backward) ------------------------------------------------------


@pytest.mark.slow
@needs_devices(2)
def test_zb_h1_matches_reference():
    """B and W run at different ticks; M = 3 is not a multiple of S = 2."""
    pipe, _ = _check("zb_h1", 2, 3)
    assert pipe.table.split and pipe.layout.placement == "loop"


@pytest.mark.slow
@needs_devices(2)
def test_zbv_matches_reference():
    """Device d holds virtual stages d and 3 - d; eval (`pipe.loss`) runs the same layers."""
    pipe, _ = _check("zbv", 2, 3, R=2, style="tiny-llama")
    assert pipe.layout.placement == "vee"
    np.testing.assert_array_equal(pipe.layout.layer_index_SRJ[:, :, 0], [[0, 6], [2, 4]])


@pytest.mark.slow
@needs_devices(4)
@pytest.mark.parametrize(
    "schedule,S,Mb,style",
    [
        ("zb_h1", 1, 2, "tiny"),
        ("zb_h1", 2, 1, "tiny-llama"),
        ("zb_h1", 3, 4, "tiny-llama"),
        ("zb_h1", 4, 5, "tiny"),
        ("zb_h1", 4, 8, "tiny-llama"),
        ("zbv", 1, 2, "tiny"),
        ("zbv", 3, 4, "tiny-llama"),
        ("zbv", 4, 5, "tiny"),
    ],
)
def test_zero_bubble_grid(schedule, S, Mb, style):
    R = 2 if schedule == "zbv" else 1
    _check(schedule, S, Mb, R, style=style, layers=S * R + (S > 1))


@pytest.mark.slow
@needs_devices(4)
def test_zero_bubble_uneven_layouts_data_and_pipe():
    _check("zb_h1", 2, 3, layers=4, layout=StageLayout(2, 1, (1, 3)), data=2)
    _check("zbv", 2, 2, R=2, layers=6, layout=StageLayout(2, 2, (1, 2, 2, 1), "vee"))


@needs_devices(4)
@pytest.mark.parametrize(
    "schedule,S,Mb,R,style,data",
    [
        ("1f1b", 2, 3, 1, "tiny", 2),
        pytest.param("interleaved_1f1b", 2, 4, 2, "tiny-llama", 1, marks=pytest.mark.slow),
        pytest.param("zb_h1", 2, 3, 1, "tiny-llama", 1, marks=pytest.mark.slow),
        pytest.param("zbv", 2, 2, 2, "tiny", 1, marks=pytest.mark.slow),
    ],
)
def test_embedding_inside_matches_reference(schedule, S, Mb, R, style, data):
    """embed_head="inside": the first virtual stage embeds each micro-batch and sends the
    lookups' gradient to the table itself; no d(input) leaves the program."""
    pipe, _ = _check(schedule, S, Mb, R, style=style, data=data, embed_head="inside")
    params = pipe.place(jax.jit(M.init_params, static_argnums=(0, 1))(pipe.model, 3))
    tokens = jnp.zeros((2 * Mb * data, SEQ + 1), jnp.int32)
    jaxpr = jax.make_jaxpr(pipe.value_and_grad)(params, tokens).jaxpr
    (program,) = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    activations = [v.aval.shape for v in (*program.invars, *program.outvars)
                   if v.aval.ndim >= 3 and v.aval.shape[-2:] == (SEQ, pipe.model.d_model)]
    assert not activations, activations  # tokens in, no d(input) out


@needs_devices(4)
@pytest.mark.parametrize(
    "schedule,style,lookups",
    [
        ("zb_h1", "tiny", True),
        ("1f1b", "tiny-llama", False),
        pytest.param("zb_h1", "tiny", False, marks=pytest.mark.slow),
        pytest.param("1f1b", "tiny-llama", True, marks=pytest.mark.slow),
    ],
)
def test_the_embeddings_gradient_either_side_of_the_program(schedule, style, lookups,
                                                            monkeypatch):
    """With the embedding outside, the table's gradient equals the reference whether the
    program makes the lookups' gradient itself (summed over `pipe` with the head's) or returns
    the first stage's d(input); tied (gpt2) and untied (llama) tables, data x pipe, and a padded
    vocabulary split over `tensor`."""
    monkeypatch.setattr(onef1b, "lookups_in_program", lambda *a: lookups)
    if lookups:  # and with the table's vocabulary split over `tensor`, padded from 250 to 256
        _check(schedule, 2, 4, style=style, vocab=250, tensor_parallel=2)
    pipe, _ = _check(schedule, 2, 4, style=style, data=2)
    params = pipe.place(jax.jit(M.init_params, static_argnums=(0, 1))(pipe.model, 3))
    jaxpr = jax.make_jaxpr(pipe.value_and_grad)(params, jnp.zeros((16, SEQ + 1), jnp.int32))
    (program,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
    d_input = [v for v in program.outvars
               if v.aval.ndim >= 3 and v.aval.shape[-2:] == (SEQ, pipe.model.d_model)]
    assert bool(d_input) != lookups, program.outvars


@needs_devices(4)
def test_the_program_sums_the_smaller_of_table_and_activations():
    """`lookups_in_program` outside: the table's elements per device (its vocabulary split over
    `tensor`) against the d(input)'s (the batch split over `data`)."""
    cfg = get_preset("tiny", num_layers=4, max_seq_len=SEQ)  # table 256 x 32 + 8 x 32 = 8448
    params = M.init_params(cfg, 0)
    for tensor, data, batch, want in [
        (1, 2, 64, False),  # d(input) per device 32 x 8 x 32 = 8192
        (1, 2, 80, True),  # 10240
        (1, 1, 32, False),  # 8192
        (2, 1, 32, True),  # the table's vocabulary split: 128 x 32 + 256 = 4352 against 8192
    ]:
        pcfg = PipelineConfig(2, 2, data_parallel=data, tensor_parallel=tensor)
        pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[: 2 * data * tensor]))
        inputs = jnp.zeros((batch, SEQ), jnp.int32)
        assert onef1b.lookups_in_program(pipe, params["embed"], inputs) == want, (tensor, batch)
    inside = PipelineConfig(2, 2, embed_head="inside")
    pipe = Pipeline.create(cfg, inside, make_mesh(inside, jax.devices()[:2]))
    assert onef1b.lookups_in_program(pipe, params["embed"], jnp.zeros((2, SEQ), jnp.int32))


@needs_devices(2)
def test_zbv_layout_must_be_vee():
    cfg = get_preset("tiny", num_layers=4, max_seq_len=SEQ)
    pcfg = PipelineConfig(num_stages=2, num_microbatches=2, num_repeats=2, schedule="zbv")
    with pytest.raises(ConfigError, match="build the layout with placement='vee'"):
        Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[:2]), StageLayout(2, 2, (1,) * 4))


@pytest.mark.slow
@pytest.mark.parametrize(
    "remat,min_count,count",
    [("none", 2, 2), ("layer", 2, 2), ("stage", 2, 2), ("none", 1, 2), ("none", 1, 1),
     ("layer", 1, 2)],
)
def test_split_backward_flops_and_values(remat, min_count, count):
    """B + W cost what the fused backward costs (XLA's own count), W a real share of it, and
    together they give the fused backward's gradients. Under remat too: B recomputes the
    forward and W gets activations, not finished weight gradients (a rematerialised layer is
    one equation of the backward, which B used to run whole). min_count 1: the second slot is
    a padded slot of an uneven layout, under `lax.cond` (run when count is 2, skipped when 1);
    its conditional splits into one in B and one in W, which used to be one run whole in B."""
    cfg = get_preset("tiny", num_layers=2, max_seq_len=16, vocab_size=64)
    w_J = jax.jit(M.init_params, static_argnums=(0, 1))(cfg, 0)["blocks"]
    h = jax.random.normal(jax.random.key(1), (4, 16, cfg.d_model))
    stage = _StageVjp(cfg, 2, min_count, remat, split=True)
    y, kept = jax.jit(lambda w, h: stage.forward(w, count, h))(w_J, h)
    dy = jnp.cos(y)
    compiled = lambda f, *a: jax.jit(f).lower(*a).compile()
    fused = compiled(lambda w, k, d: stage.backward(w, count, k, d), w_J, kept, dy)
    b = compiled(lambda w, k, d: stage.input_grad(w, count, k, d), w_J, kept, dy)
    dh_b, carry = b(w_J, kept, dy)
    kept_w = [kept[i] for i in stage.split.w_stashed]
    if remat == "none":  # W reads only some of the stash (the matmuls' inputs)
        assert 0 < len(kept_w) < len(kept)
    else:  # the stash holds layer or stage inputs, which only B's recompute reads (W may read
        # a padded slot's predicate)
        assert not [k.shape for k in kept_w if k.ndim]
    # Activations and cotangents (and a lean norm's finished [D] gradients), never a matrix of
    # weight gradients.
    assert all(c.shape[:2] == h.shape[:2] or c.ndim <= 1 for c in carry), [c.shape for c in carry]
    w = compiled(lambda w, k, c: stage.weight_grad(w, count, k, c), w_J, kept_w, carry)
    dw, dh = fused(w_J, kept, dy)
    np.testing.assert_allclose(dh_b, dh, rtol=1e-6, atol=1e-7)
    for x, want in zip(jax.tree.leaves(w(w_J, kept_w, carry)), jax.tree.leaves(dw), strict=True):
        np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-7)
    b, w, fused = (c.cost_analysis()["flops"] for c in (b, w, fused))
    # Under remat the fused backward also recomputes the forward, about a quarter of it.
    share = 0.3 if remat == "none" else 0.25
    assert b + w <= 1.05 * fused and w >= share * fused, (b, w, fused)


def _boundary_run(schedule, boundary, run):
    """(dtypes every ppermute of the executor carries, loss or None)."""
    cfg = get_preset("tiny", num_layers=4, max_seq_len=SEQ)
    params = jax.jit(M.init_params, static_argnums=(0, 1))(cfg, 3)
    tokens = jax.random.randint(jax.random.key(7), (4, SEQ + 1), 0, cfg.vocab_size)
    pcfg = PipelineConfig(2, 2, schedule=schedule, boundary_dtype=boundary)
    pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[:2]))
    placed = pipe.place(params)
    jaxpr = jax.make_jaxpr(pipe.value_and_grad)(placed, tokens)
    sent = {str(v.aval.dtype) for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "ppermute"
            for v in e.invars}
    loss = float(pipe.jit(pipe.value_and_grad)(placed, tokens)[0]) if run else None
    return sent, loss


@needs_devices(2)
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b", "zb_h1"])
def test_boundary_dtype_is_what_crosses_between_stages(schedule):
    """Every ppermute of the forward + backward executor carries `boundary_dtype`; without it
    the activations' own dtype crosses."""
    for boundary in (None, "bfloat16"):
        sent, _ = _boundary_run(schedule, boundary, run=False)
        assert sent == {boundary or "float32"}, sent


@pytest.mark.slow
@needs_devices(2)
def test_boundary_dtype_rounding_changes_the_loss_a_little():
    (_, full), (_, half) = (_boundary_run("1f1b", b, run=True) for b in (None, "bfloat16"))
    assert half != full
    np.testing.assert_allclose(half, full, rtol=1e-2)


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            yield from _eqns(sub)


def _tick_body(jaxpr):
    """The executor's tick loop body: the scan whose body holds the sends."""
    for e in _eqns(jaxpr):
        if e.primitive.name == "scan":
            body = e.params["jaxpr"].jaxpr
            if any(x.primitive.name == "ppermute" for x in _eqns(body)):
                return body
    raise AssertionError("no tick loop found")


def _derived(body, sources):
    """Variables of `body` computed (at top level) from any of `sources`, not counting paths
    through an optimization barrier (XLA's CPU compiler drops them)."""
    seen = set(sources)
    for e in body.eqns:
        if e.primitive.name == "optimization_barrier":
            continue
        if any(v in seen for v in e.invars if not isinstance(v, jax.extend.core.Literal)):
            seen.update(e.outvars)
    return seen


@needs_devices(2)
@pytest.mark.parametrize("schedule", ["zb_h1", "zbv"])
def test_a_ticks_weight_gradients_finish_before_its_sends(schedule):
    """In a split table every send of a tick reads data computed by each of the tick's op
    conditionals (F, B and W), so it waits for the tick's W. Nothing else orders them (a path
    through an optimization barrier does not count), and a W run
    after the sends lands beside the next tick's op (pinned processes, S = 2, M = 4: zb_h1 /
    1f1b step 1.18-1.22 with nothing ordering them, 1.02-1.09 with a barrier, 0.96-0.98 with
    the sends reading W's conditional). The conditional of a B/W pair that runs at one tick
    (`schedule.fused_backward`: B, then W on its carry) is one of them."""
    cfg = get_preset("tiny", num_layers=4, max_seq_len=SEQ)
    params = jax.jit(M.init_params, static_argnums=(0, 1))(cfg, 3)
    tokens = jnp.zeros((4, SEQ + 1), jnp.int32)
    pcfg = PipelineConfig(2, 2, schedule=schedule, num_repeats=2 if schedule == "zbv" else 1)
    pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[:2]))
    body = _tick_body(jax.make_jaxpr(pipe.value_and_grad)(pipe.place(params), tokens).jaxpr)
    conds = [e for e in body.eqns if e.primitive.name == "cond"]
    sends = [e for e in conds if any(x.primitive.name == "ppermute" for x in _eqns_of(e))]
    ops = [e for e in conds if any(x.primitive.name == "dot_general" for x in _eqns_of(e))]
    ops = [e for e in ops if e not in sends]
    # F, B and W, and a joined pair's B + W where the table joins one (zb_h1 at S = 2)
    fuses = bool(fused_backward(pipe.table).any())
    assert fuses == (schedule == "zb_h1")
    assert sends and len(ops) == 3 + fuses, [e.primitive.name for e in body.eqns]
    for op in ops:
        after = _derived(body, op.outvars)
        for e in sends:
            operands = [v for v in e.invars[1:] if not isinstance(v, jax.extend.core.Literal)]
            assert all(v in after for v in operands if v.aval.ndim >= 3), e


def _eqns_of(eqn):
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from _eqns(sub)
