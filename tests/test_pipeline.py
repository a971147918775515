"""The pipelined model equals the unpipelined reference in loss and gradients."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpipe import model as M
from jaxpipe.config import ConfigError, PipelineConfig, get_preset
from jaxpipe.layout import StageLayout
from jaxpipe.mesh import make_mesh
from jaxpipe.pipeline import Pipeline
from jaxpipe.schedule import BWD, FWD, IDLE

SEQ = 8
BATCH = 16  # divisible by every (micro-batches x data) below except where an error is wanted


def _tokens(batch=BATCH, vocab=256, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, SEQ + 1), 0, vocab)


def _pipeline(cfg, S, Mb, R, data=1, layout=None, schedule=None, **kw):
    schedule = schedule or ("gpipe" if R == 1 else "circular")
    pcfg = PipelineConfig(
        num_stages=S, num_microbatches=Mb, num_repeats=R, schedule=schedule, data_parallel=data,
        **kw,
    )
    mesh = make_mesh(pcfg, jax.devices()[: S * data])
    return Pipeline.create(cfg, pcfg, mesh, layout=layout, poison_bubbles=True)


def _check_against_reference(cfg, pipe, batch=BATCH, tol=2e-5):
    params = M.init_params(cfg, seed=3)
    tokens = _tokens(batch)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: M.reference_loss(cfg, p, tokens)))(
        params
    )
    loss, grads = jax.jit(pipe.value_and_grad)(pipe.place(params), tokens)
    grads = jax.jit(pipe.to_canonical)(grads)
    assert np.isfinite(float(loss)), "a poisoned bubble leaked into the loss"
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6, atol=1e-6)
    for path, g, r in zip(
        jax.tree_util.tree_leaves_with_path(grads),
        jax.tree.leaves(grads),
        jax.tree.leaves(ref_grads),
        strict=True,
    ):
        assert np.all(np.isfinite(g)), f"non-finite gradient at {path[0]}"
        np.testing.assert_allclose(g, r, atol=tol * max(1.0, float(jnp.max(jnp.abs(r)))),
                                   err_msg=str(path[0]))


# (style, stages, micro-batches, repeats, data, extra layers beyond 2 per virtual stage)
FAST = [
    ("gpt2", 4, 1, 1, 1, 0),  # M < S
    ("gpt2", 3, 4, 2, 1, 0),  # circular, S >= 3, M > S
    ("gpt2", 4, 2, 2, 1, 0),  # circular, M < S
    ("llama", 4, 6, 2, 1, 0),  # circular, M non-multiple of S
    ("llama", 4, 8, 2, 2, 1),  # data x pipe = 2 x 4, circular, uneven
]
# The full grid: stages {1, 2, 4, 8} x micro-batches {1, 2, S, 2S, S + 1} x repeats {1, 2, 3}
# for both block styles, and data x pipe = 2 x 4.
SLOW = [
    (style, S, Mb, R, D, 0)
    for style in ("gpt2", "llama")
    for S in (1, 2, 4, 8)
    for Mb in sorted({1, 2, S, 2 * S, S + 1})
    for R in ((1, 2, 3) if style == "gpt2" else (1, 2))
    for D in ((1, 2) if S == 4 else (1,))
    if (style, S, Mb, R, D, 0) not in FAST
    and (R == 1 or Mb in (1, S + 1)) and (D == 1 or Mb == S)
]
SLOW.append(("gpt2", 2, 3, 1, 1, 1))  # M not a multiple of S, uneven stages


def _case(style, S, Mb, R, D, extra):
    preset = "tiny" if style == "gpt2" else "tiny-llama"
    cfg = get_preset(preset, num_layers=2 * S * R + extra, max_seq_len=SEQ)
    _check_against_reference(cfg, _pipeline(cfg, S, Mb, R, D), batch=2 * Mb * D)


@pytest.mark.parametrize("style,S,Mb,R,D,extra", FAST)
def test_matches_reference(style, S, Mb, R, D, extra):
    _case(style, S, Mb, R, D, extra)


@pytest.mark.slow
@pytest.mark.parametrize("style,S,Mb,R,D,extra", SLOW)
def test_matches_reference_full_grid(style, S, Mb, R, D, extra):
    _case(style, S, Mb, R, D, extra)


@pytest.mark.parametrize("remat", [pytest.param("layer", marks=pytest.mark.slow), "stage"])
def test_remat_matches_reference(remat):
    cfg = get_preset("tiny", num_layers=8, max_seq_len=SEQ)
    _check_against_reference(cfg, _pipeline(cfg, 2, 4, 2, remat=remat))


def test_bf16_boundary_close_to_reference():
    cfg = get_preset("tiny", num_layers=4, max_seq_len=SEQ)
    pipe = _pipeline(cfg, 4, 4, 1, boundary_dtype="bfloat16")
    params = M.init_params(cfg, seed=3)
    tokens = _tokens()
    loss = jax.jit(pipe.loss)(pipe.place(params), tokens)
    ref = M.reference_loss(cfg, params, tokens)
    assert abs(float(loss) - float(ref)) < 2e-2
    assert float(loss) != float(ref)  # the bf16 cast is really applied


def test_explicit_uneven_layout_runs_layers_in_order():
    # Layers are not interchangeable (each has its own weights): any out-of-order or skipped
    # layer changes the loss and the per-layer gradients.
    cfg = get_preset("tiny", num_layers=9, max_seq_len=SEQ)
    layout = StageLayout(3, 2, (1, 2, 1, 2, 2, 1))
    assert layout.describe() == "0-0+4-5 | 1-2+6-7 | 3-3+8-8"
    _check_against_reference(cfg, _pipeline(cfg, 3, 3, 2, layout=layout), batch=6)


def test_layout_round_trip_and_no_dropped_layers():
    for L, S, R in [(30, 4, 1), (61, 8, 1), (126, 16, 1), (13, 3, 2), (8, 8, 1)]:
        layout = StageLayout.uniform(L, S, R)
        assert layout.num_layers == L and min(layout.layer_counts) >= 1
        assert max(layout.layer_counts) - min(layout.layer_counts) <= 1
        index = layout.layer_index_SRJ
        assert sorted(index[index >= 0].tolist()) == list(range(L))
        blocks = {"w": jnp.arange(L * 2, dtype=jnp.float32).reshape(L, 2)}
        back = layout.to_canonical(layout.to_pipeline(blocks))
        np.testing.assert_array_equal(back["w"], blocks["w"])


def test_pipeline_view_holds_the_indexed_layers():
    # Even layouts move by reshape and transpose, uneven ones by a gather: both must put layer
    # layer_index_SRJ[s, r, j] in slot (s, r, j), padding slots zero.
    for L, S, R in [(8, 2, 2), (12, 3, 2), (8, 8, 1), (6, 2, 1), (7, 2, 2), (9, 4, 1)]:
        layout = StageLayout.uniform(L, S, R)
        assert layout.is_even == (L % (S * R) == 0)
        x = jnp.arange(L * 3, dtype=jnp.float32).reshape(L, 3) + 1
        view = np.asarray(layout.to_pipeline({"w": x})["w"])
        index = layout.layer_index_SRJ
        assert view.shape == (*index.shape, 3)
        np.testing.assert_array_equal(view[index >= 0], np.asarray(x)[index[index >= 0]])
        assert not view[index < 0].any()
        np.testing.assert_array_equal(layout.to_canonical({"w": view})["w"], x)


def test_pipeline_layout_puts_layer_on_its_stage():
    layout = StageLayout.uniform(8, 2, 2)  # circular: layer l on stage (l // 2) mod 2
    for s in range(2):
        for r in range(2):
            for j in range(2):
                layer = layout.layer_index_SRJ[s, r, j]
                assert (layer // 2) % 2 == s


def test_clear_errors():
    cfg = get_preset("tiny", max_seq_len=SEQ)
    with pytest.raises(ConfigError, match="multiple of num_microbatches x data_parallel"):
        PipelineConfig(num_stages=2, num_microbatches=3).check_batch(16)
    with pytest.raises(ConfigError, match="devices, but 8 are available"):
        make_mesh(PipelineConfig(num_stages=3))
    with pytest.raises(ConfigError, match="unknown schedule"):
        PipelineConfig(schedule="zigzag")
    with pytest.raises(ConfigError, match="unknown model preset"):
        get_preset("gpt5")
    with pytest.raises(ConfigError, match="positive integer"):
        PipelineConfig(num_stages=0)
    with pytest.raises(ConfigError, match="cannot fill"):
        _pipeline(cfg.replace(num_layers=3), 4, 4, 1)
    with pytest.raises(ConfigError, match="use schedule 'circular'"):
        PipelineConfig(num_stages=2, num_repeats=2, schedule="gpipe")
    with pytest.raises(ConfigError, match="max_seq_len"):
        M.embed_apply(cfg, M.init_params(cfg), jnp.zeros((1, SEQ + 1), jnp.int32))
    with pytest.raises(ConfigError, match="refusing to allocate"):
        M.init_params(get_preset("gpt3-175b"))


def test_preset_parameter_counts():
    # Analytic counts of the real shapes (embedding + blocks + head).
    assert abs(get_preset("gpt2").num_params() - 124.4e6) < 0.5e6
    assert abs(get_preset("gpt3-175b").num_params() - 174.6e9) < 1e9
    assert abs(get_preset("llama-65b").num_params() - 65.3e9) < 0.5e9
    cfg = get_preset("tiny-llama")
    counted = sum(x.size for x in jax.tree.leaves(M.init_params(cfg)))
    assert counted == cfg.num_params()
    cfg = get_preset("tiny")
    assert sum(x.size for x in jax.tree.leaves(M.init_params(cfg))) == cfg.num_params()


@pytest.mark.parametrize(
    "style,S,Mb,R,D,counts",
    [
        ("gpt2", 3, 4, 1, 1, (1, 3, 1)),  # GPT-3 style: first and last stage lighter
        pytest.param("gpt2", 3, 2, 2, 1, (1, 2, 1, 1, 1, 1), marks=pytest.mark.slow),
        ("llama", 2, 2, 2, 2, (1, 2, 2, 1)),  # data x pipe, circular
        pytest.param("llama", 1, 2, 1, 1, (4,), marks=pytest.mark.slow),
    ],
)
def test_embed_and_head_inside_stages_match_reference(style, S, Mb, R, D, counts):
    preset = "tiny" if style == "gpt2" else "tiny-llama"
    cfg = get_preset(preset, num_layers=sum(counts), max_seq_len=SEQ)
    layout = StageLayout(S, R, counts)
    pipe = _pipeline(cfg, S, Mb, R, D, layout=layout, embed_head="inside")
    _check_against_reference(cfg, pipe, batch=2 * Mb * D)


# Overlapped sends (hop 2): (style, S, Mb, R, remat, embed_head, layer counts or None).
OVERLAP = [
    ("gpt2", 2, 3, 1, "none", "outside", (1, 2)),  # uneven: 2 units a tick, chunked sends
    pytest.param("llama", 3, 4, 2, "none", "outside", None, marks=pytest.mark.slow),  # circular
    # one unit a tick, M < S
    pytest.param("gpt2", 3, 2, 2, "stage", "outside", None, marks=pytest.mark.slow),
    pytest.param("llama", 2, 4, 2, "none", "inside", (1, 2, 2, 1), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("style,S,Mb,R,remat,embed_head,counts", OVERLAP)
def test_overlapped_sends_match_reference(style, S, Mb, R, remat, embed_head, counts):
    preset = "tiny" if style == "gpt2" else "tiny-llama"
    layers = sum(counts) if counts else 2 * S * R
    cfg = get_preset(preset, num_layers=layers, max_seq_len=SEQ)
    layout = StageLayout(S, R, counts) if counts else None
    pipe = _pipeline(cfg, S, Mb, R, layout=layout, remat=remat, embed_head=embed_head,
                     overlap_sends=True)
    assert pipe.table.hop == 2
    _check_against_reference(cfg, pipe, batch=2 * Mb)


def test_overlapped_sends_leave_no_permute_waiting_on_compute():
    """Every collective-permute of the hop-2 step takes a value computed in an earlier loop
    iteration: the send and the unit's compute of an iteration are independent."""
    cfg = get_preset("tiny", num_layers=4, max_seq_len=SEQ)
    pipe = _pipeline(cfg, 2, 2, 1, overlap_sends=True)
    params = pipe.place(M.init_params(cfg, seed=3))
    jaxpr = jax.make_jaxpr(pipe.loss)(params, _tokens(4))

    def scans(eqns):
        for e in eqns:
            if e.primitive.name == "scan":
                yield e
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                yield from scans(sub.eqns)

    body = next(e for e in scans(jaxpr.jaxpr.eqns)
                if any(q.primitive.name == "ppermute" for q in e.params["jaxpr"].jaxpr.eqns))
    eqns = body.params["jaxpr"].jaxpr.eqns
    permute = next(q for q in eqns if q.primitive.name == "ppermute")
    # What the permute reads, back to the loop's inputs: no block computation on the way.
    producers = {v: q for q in eqns for v in q.outvars}
    needed, todo = set(), list(permute.invars)
    while todo:
        v = todo.pop()
        if isinstance(v, jax.extend.core.Literal) or v in needed or v not in producers:
            continue
        needed.add(v)
        q = producers[v]
        assert q.primitive.name not in ("dot_general", "cond", "checkpoint", "remat"), q
        todo.extend(q.invars)


def _saved_shapes(fn, *args) -> tuple[list[tuple[int, ...]], str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    saved = [tuple(int(d) for d in m.group(1).split(",") if d)
             for m in re.finditer(r"^\w+\[([\d,]*)\] ", out.getvalue(), re.M)]
    return saved, out.getvalue()


@pytest.mark.parametrize("schedule", ["gpipe", "circular"])
def test_head_inside_saves_no_logits_or_head_weights(schedule):
    """With the head inside, the last stage applies it after the tick loop, one micro-batch at
    a time under a checkpoint: nothing of vocabulary size is saved for the backward (in the
    loop, autodiff saved every iteration's logits and converted head kernel)."""
    cfg = get_preset("tiny", num_layers=4, max_seq_len=SEQ)
    R = 1 if schedule == "gpipe" else 2
    pipe = _pipeline(cfg, 2, 4, R, schedule=schedule, embed_head="inside")
    params = pipe.place(M.init_params(cfg, seed=3))
    saved, text = _saved_shapes(pipe.loss, params, _tokens(8))
    assert cfg.vocab_size not in {cfg.d_model, cfg.d_ff, SEQ, 8}
    assert saved and not [shape for shape in saved if cfg.vocab_size in shape], text


def test_embedding_inside_saves_only_token_ids_per_iteration():
    """Under remat layer with the vocabulary split over tensor, each iteration of the tick loop
    saves the unit's input and the token ids it embeds, nothing else of activation size (the
    split lookup's select once saved a [tensor, B, T, D] mask every iteration)."""
    cfg = get_preset("tiny-llama", num_layers=8, max_seq_len=SEQ)
    pcfg = PipelineConfig(num_stages=2, num_microbatches=4, num_repeats=2, schedule="circular",
                          remat="layer", embed_head="inside", tensor_parallel=2)
    pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[:4]))
    params = pipe.place(M.init_params(cfg, seed=3))
    saved, text = _saved_shapes(pipe.loss, params, _tokens(8))
    iters = max(shape[0] for shape in saved if len(shape) >= 3)  # the loop's length
    assert iters >= pipe.forward_table.num_ticks
    per_iteration = sorted(shape[1:] for shape in saved if len(shape) >= 3 and shape[0] == iters)
    assert per_iteration == [(2, SEQ), (2, SEQ, cfg.d_model)], text


@pytest.mark.parametrize("schedule", ["gpipe", "circular"])
def test_tick_loop_saves_no_weight_slice_per_iteration(schedule):
    """Without remat, autodiff of the tick loop saves what the layers compute, but not the
    weight slice each iteration reads (the backward slices the stage's stack again): a saved
    [iterations, *kernel] stack would be a copy of the stage's weights per tick."""
    cfg = get_preset("tiny", num_layers=4, max_seq_len=SEQ)
    R = 1 if schedule == "gpipe" else 2
    pipe = _pipeline(cfg, 2, 4, R, schedule=schedule)
    params = pipe.place(M.init_params(cfg, seed=3))
    saved, text = _saved_shapes(pipe.loss, params, _tokens(8))
    kernels = {a.shape[-2:] for a in jax.tree.leaves(M.init_params(cfg, 0)["blocks"])
               if a.ndim == 3}
    stacked = [shape for shape in saved if len(shape) == 3 and shape[1:] in kernels]
    assert not stacked, text
    # ... while the layers' own intermediates are still saved (no recompute without remat).
    assert any(len(shape) >= 4 and shape[-1] == cfg.d_ff for shape in saved), text
    # Lean blocks: attention's scores and probabilities ([..., T, T]) are recomputed, not saved
    # per iteration (an outer policy that saved every intermediate overrode the block's own).
    assert not [shape for shape in saved if shape[-2:] == (SEQ, SEQ)], text


@pytest.mark.parametrize("schedule,R", [("gpipe", 1), ("circular", 2)])
def test_gpipe_and_circular_train_on_their_forward_backward_table(schedule, R):
    """A GPipe or circular training step runs the schedule's forward + backward table (every
    forward of a stage before its first backward) on the one forward + backward executor, and
    gives autodiff's loss and gradients of the ring forward that `loss` runs."""
    cfg = get_preset("tiny", num_layers=4, max_seq_len=SEQ)
    pipe = _pipeline(cfg, 2, 3, R, schedule=schedule)
    assert pipe.table.explicit_backward and not pipe.forward_table.explicit_backward
    for s in range(2):
        ops = [o for o in pipe.table.op[:, s] if o != IDLE]
        assert ops == [FWD] * (3 * R) + [BWD] * (3 * R), ops
    params = pipe.place(M.init_params(cfg, seed=3))
    tokens = _tokens(6)
    loss, grads = pipe.jit(pipe.value_and_grad)(params, tokens)
    ring_loss, ring_grads = jax.jit(jax.value_and_grad(pipe.loss))(params, tokens)
    np.testing.assert_allclose(loss, ring_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ring_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
