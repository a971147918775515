"""The executor's stash: residuals for the backward and B's carries for W, sharing slots."""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import needs_devices

from jaxpipe import model as M
from jaxpipe import onef1b
from jaxpipe.config import PipelineConfig, get_preset
from jaxpipe.mesh import make_mesh
from jaxpipe.pipeline import Pipeline
from jaxpipe.stash import Stash

S32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
S16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731


def _plan(res=2, wres=3, carry=2):
    return types.SimpleNamespace(num_res=res, num_wres=wres, num_carry=carry)


def _filled(shapes, seed):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=a.shape), a.dtype) for a in shapes]


def test_carry_takes_the_slot_of_a_residual_b_read():
    """A carry leaf shares the buffer of a B-only residual of its size and dtype (of another
    shape too): B's write goes over what B has read, leaving the other slots and the leaves W
    reads as they were. Leaves without a partner keep buffers of their own."""
    res = [S32(2, 3), S16(4), S32(5), S32(2, 2)]  # leaf 2 is read by W too
    carry = [S32(3, 2), S32(5), S16(2, 2), S32(7)]
    stash = Stash(_plan(), res, w_kept=(2,), carry_shapes=carry)
    # carry 1 matches only leaf 2, which W still needs; carry 3 matches nothing.
    assert stash.pairs == [(0, 0), (1, 2)]
    bufs = stash.zeros()
    assert sorted(bufs["res"]) == [2, 3] and sorted(bufs["carry"]) == [1, 3]
    assert bufs["pair"][0].shape == (3, 2, 3)  # wres slots, the residual's shape
    k = lambda j: {"res": 1, "wres": j, "carry": 0}  # noqa: E731
    kept_a, kept_b = _filled(res, 0), _filled(res, 1)
    bufs = stash.write_forward(bufs, kept_a, k(0))
    for got, want in zip(stash.read_backward(bufs, k(0)), kept_a, strict=True):
        np.testing.assert_array_equal(got, want)
    bufs = stash.write_forward(bufs, kept_b, {**k(2), "res": 0})
    c = _filled(carry, 2)
    bufs = stash.write_carry(bufs, c, k(0))
    kept_w, got_c = stash.read_weight(bufs, k(0))
    np.testing.assert_array_equal(kept_w[0], kept_a[2])
    for got, want in zip(got_c, c, strict=True):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    for got, want in zip(stash.read_backward(bufs, {**k(2), "res": 0}), kept_b, strict=True):
        np.testing.assert_array_equal(got, want)  # the other slot is untouched


def test_no_pairs_when_a_shared_slot_costs_more():
    """Pairing costs a wres slot per pair against a res slot plus a carry slot; where the
    table holds more wres slots than those together, every leaf keeps its own buffer."""
    res, carry = [S32(4)], [S32(4)]
    assert Stash(_plan(res=2, wres=3, carry=2), res, (), carry).pairs == [(0, 0)]
    stash = Stash(_plan(res=1, wres=3, carry=1), res, (), carry)
    assert stash.pairs == []
    bufs = stash.zeros()
    assert bufs["carry"][0].shape == (1, 4) and bufs["pair"] == {}
    k = {"res": 0, "wres": 2, "carry": 0}
    bufs = stash.write_forward(bufs, _filled(res, 0), k)
    c = _filled(carry, 1)
    bufs = stash.write_carry(bufs, c, k)
    np.testing.assert_array_equal(stash.read_weight(bufs, k)[1][0], c[0])
    assert Stash(_plan(), res).pairs == []  # a fused backward has no carry


def test_a_carry_takes_the_nearest_residual_that_fits():
    """`near` (the residuals each carry is computed from, nearest first) picks the partner
    among leaves that fit; a carry whose near leaves do not fit takes the first free one."""
    res, carry = [S32(4), S32(4), S16(4)], [S32(4), S32(4)]
    assert Stash(_plan(), res, (), carry).pairs == [(0, 0), (1, 1)]
    assert Stash(_plan(), res, (), carry, near=[(1, 0), (0,)]).pairs == [(0, 1), (1, 0)]
    assert Stash(_plan(), res, (), carry, near=[(2, 1), ()]).pairs == [(0, 1), (1, 0)]


@needs_devices(4)
def test_zb_h1_needs_no_more_temporaries_than_1f1b():
    """Compiled on CPU (S = 4, M = 8), the zb_h1 step's temporaries are within 5 % of 1f1b's;
    with carries in buffers of their own they were 1.28 x."""
    cfg = get_preset("tiny", num_layers=4, max_seq_len=32)
    params = M.init_params(cfg, 0)
    tokens = jnp.zeros((16, 33), jnp.int32)
    temp = {}
    for schedule in ("1f1b", "zb_h1"):
        pcfg = PipelineConfig(num_stages=4, num_microbatches=8, schedule=schedule)
        pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[:4]))
        compiled = pipe.jit(pipe.value_and_grad).lower(pipe.place(params), tokens).compile()
        temp[schedule] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["zb_h1"] <= 1.05 * temp["1f1b"], temp


@needs_devices(2)
@pytest.mark.parametrize(
    "preset,schedule",
    [("tiny", "1f1b"), pytest.param("tiny-llama", "zb_h1", marks=pytest.mark.slow)],
)
def test_a_narrow_compute_dtype_stashes_no_weights(preset, schedule, monkeypatch):
    """With bfloat16 compute, the stage casts its float32 weights once per step: no stashed
    residual has a weight's shape (a cast inside the forward would be stashed per slot, which
    made llama-3-70b's 1f1b step on a v5p pod need 125 GiB of temporaries instead of 67), and
    the loss and gradients equal the unpipelined reference's at bfloat16 tolerance."""
    stashed = []

    class Recording(Stash):
        def __init__(self, plan, res_shapes, *rest, **kw):
            stashed.extend(res_shapes)
            super().__init__(plan, res_shapes, *rest, **kw)

    monkeypatch.setattr(onef1b, "Stash", Recording)
    cfg = get_preset(preset, num_layers=2, max_seq_len=16, dtype="bfloat16")
    params = M.init_params(cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, cfg.vocab_size)
    pcfg = PipelineConfig(num_stages=2, num_microbatches=2, schedule=schedule)
    pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[:2]))
    loss, grads = pipe.jit(pipe.value_and_grad)(pipe.place(params), tokens)
    weights = {a.shape[1:] for a in jax.tree.leaves(params["blocks"])}
    weights |= {(1,) + w for w in weights}  # stacked over a stage's layers
    assert stashed and not [r.shape for r in stashed if r.shape in weights], stashed
    ref_loss, ref = jax.value_and_grad(lambda p: M.reference_loss(cfg, p, tokens))(params)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=2e-2)
    got = pipe.to_canonical(grads)
    assert {g.dtype for g in jax.tree.leaves(got["blocks"])} == {jnp.dtype(jnp.float32)}
    flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t["blocks"])])
    g, r = flat(got), flat(ref)
    assert np.linalg.norm(g - r) <= 0.05 * np.linalg.norm(r)


@needs_devices(2)
def test_a_carry_goes_over_a_residual_of_its_own_layer(monkeypatch):
    """B writes each carry over the residual of the same stage-local layer it reads, so no
    conditional of the tick loop copies a paired buffer whole (S = 2, M = 4, two layers a
    stage). Paired across layers, as carries and residuals come in opposite layer order, each
    B copied its layers' paired buffers whole."""
    made = []

    class Recording(Stash):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(onef1b, "Stash", Recording)
    cfg = get_preset("tiny", num_layers=4, max_seq_len=32)
    pcfg = PipelineConfig(num_stages=2, num_microbatches=4, schedule="zb_h1")
    pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[:2]))
    params = pipe.place(M.init_params(cfg, 0))
    text = pipe.jit(pipe.value_and_grad).lower(params, jnp.zeros((8, 33), jnp.int32)).compile()
    text = text.as_text()
    (stash,) = made
    assert stash.pairs
    dims = lambda i: ",".join(map(str, (stash.plan.num_wres, *stash.res_shapes[i].shape)))  # noqa: E731
    paired = {f"f32[{dims(i)}]" for i, _ in stash.pairs}
    copies = re.findall(r"= (f32\[[\d,]+\])\{[\d,]*\} copy\(%get-tuple-element", text)
    assert not [c for c in copies if c in paired], (paired, copies)
