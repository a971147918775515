"""State that scales with the mesh: sharded init, ZeRO-1 and FSDP over `data`, and the
vocabulary-parallel embedding and head over `tensor`."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpipe import model as M
from jaxpipe import placement
from jaxpipe.checkpoint import Checkpoints, canonical_state
from jaxpipe.config import ConfigError, PipelineConfig, get_preset
from jaxpipe.costmodel import outer_params
from jaxpipe.train import TrainConfig, Trainer
from tests.conftest import needs_devices

CFG = get_preset("tiny-llama", num_layers=5)
TCFG = TrainConfig(steps=3, batch_size=8, seq_len=16)


def _trainer(D=2, S=2, Tp=2, schedule="gpipe", cfg=CFG, **kw):
    pcfg = PipelineConfig(
        num_stages=S, num_microbatches=2, data_parallel=D, tensor_parallel=Tp, schedule=schedule,
        **kw,
    )
    return Trainer.create(cfg, pcfg, TCFG, devices=jax.devices()[: D * S * Tp])


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded abstract arrays (the largest device)."""
    total = 0
    for a in jax.tree.leaves(tree):
        total += int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
    return total


def _losses(trainer, steps=3):
    V = trainer.pipe.model.vocab_size
    tokens = np.random.RandomState(0).randint(0, V, (8, 17)).astype(np.int32)
    state, out = trainer.init_state(), []
    for _ in range(steps):
        state, m = trainer.step_fn(state, trainer.put_batch(tokens))
        out.append(float(m["loss"]))
    return state, out


@needs_devices(8)
def test_init_builds_each_shard_in_place_and_equals_the_canonical_init():
    trainer = _trainer(fsdp=True)
    state = trainer.init_state()
    canonical = jax.jit(trainer.pipe.to_canonical)(state.params)
    want = M.init_params(CFG, TCFG.seed)
    assert jax.tree.structure(canonical) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(canonical), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for got, sh in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.shardings), strict=True):
        assert got.sharding.is_equivalent_to(sh, got.ndim)
    # One program makes the whole state; per device it writes and uses a fraction of it.
    whole = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(trainer.abstract_state()))
    init = trainer.pipe.jit(trainer._fresh_state, out_shardings=trainer.shardings)
    mem = init.lower(jax.random.key(0)).compile().memory_analysis()
    assert mem.output_size_in_bytes + mem.temp_size_in_bytes < 0.3 * whole


@needs_devices(8)
@pytest.mark.parametrize(
    "kw,schedule",
    [
        pytest.param({"zero1": True}, "gpipe", marks=pytest.mark.slow),
        ({"fsdp": True}, "gpipe"),
        pytest.param({"fsdp": True}, "1f1b", marks=pytest.mark.slow),
    ],
)
def test_zero1_and_fsdp_change_no_result(kw, schedule):
    _, want = _losses(_trainer(schedule=schedule))
    trainer = _trainer(schedule=schedule, **kw)
    state, got = _losses(trainer)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    mu = state.opt_state[1][0].mu["blocks"]["mlp"]["up"]["kernel"]  # [S, R, J, D, F]
    assert mu.sharding.spec == P("pipe", None, None, "data", "tensor")
    up = state.params["blocks"]["mlp"]["up"]["kernel"]
    assert ("data" in up.sharding.spec) == ("fsdp" in kw)


@needs_devices(8)
def test_zero1_splits_the_optimizer_state_over_data():
    sizes = {}
    for zero1 in (False, True):
        trainer = _trainer(D=4, S=2, Tp=1, zero1=zero1)
        sizes[zero1] = _bytes_per_device(trainer.abstract_state().opt_state)
    assert sizes[True] <= 0.3 * sizes[False], sizes


@needs_devices(8)
def test_fsdp_gathers_blocks_once_per_step_outside_the_tick_loop():
    trainer = _trainer(fsdp=True)
    batch = jax.ShapeDtypeStruct((8, 17), jnp.int32, sharding=trainer.pipe.batch_sharding())
    hlo = trainer.step_fn.lower(trainer.abstract_state(), batch).compile().as_text()
    where = []  # the computation each all-gather sits in
    computation = None
    for line in hlo.splitlines():
        if line.startswith(("%", "ENTRY")):
            computation = line.split()[0]
        elif re.search(r" all-gather(-start)?\(", line):
            where.append(computation)
    assert where and set(where) == {"ENTRY"}, where


def test_over_data_picks_the_largest_free_divisible_dim():
    assert placement.over_data(P("pipe", None, None, None, "tensor"), (2, 1, 3, 8, 4), 4) == P(
        "pipe", None, None, "data", "tensor"
    )
    assert placement.over_data(P(None, None), (6, 6), 3) == P("data", None)  # first on ties
    assert placement.over_data(P(None), (5,), 2) == P(None)  # nothing divides: unchanged
    assert placement.over_data(P("pipe"), (4, 8), 1) == P("pipe")


def test_vocabulary_parallel_embedding_and_head_specs():
    for preset in ("tiny", "tiny-llama"):  # tied (gpt2) and untied (llama) heads
        cfg = get_preset(preset, num_layers=2, tie_embeddings=preset == "tiny")
        specs = placement.param_specs(M.abstract_params(cfg), (None,), tensor=2)
        assert specs["embed"]["tok"] == P("tensor", None)
        if not cfg.tied:
            assert specs["head"]["out"]["kernel"] == P(None, "tensor")
        assert all(s == P() for s in jax.tree.leaves(specs["head"]["norm"]))
    odd = get_preset("tiny", num_layers=2, vocab_size=255)
    specs = placement.param_specs(M.abstract_params(odd), (None,), tensor=2)
    assert specs["embed"]["tok"] == P()  # the canonical 255 rows do not split in 2 ...
    assert placement.vocab_rows(255, 2) == 256  # ... so the pipeline layout pads them
    assert placement.vocab_rows(50257, 8) == 51200  # GPT-2: 8 slices of 6,400 rows
    assert placement.vocab_rows(128256, 8) == 128256  # divides: no padding
    assert placement.vocab_rows(50257, 1) == 50257


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_padded_vocabulary_changes_no_loss_and_gets_no_gradient(preset):
    cfg = get_preset(preset, num_layers=2, vocab_size=257, tie_embeddings=preset == "tiny")
    params = M.init_params(cfg, 0)
    padded = M.pad_vocab(cfg, params, 384)
    assert padded["embed"]["tok"].shape == (384, cfg.d_model)
    tokens = np.random.RandomState(0).randint(0, 257, (2, 9)).astype(np.int32)
    loss, grads = jax.value_and_grad(M.reference_loss, argnums=1)(cfg, padded, tokens)
    np.testing.assert_allclose(loss, M.reference_loss(cfg, params, tokens), rtol=1e-6)
    assert not np.asarray(grads["embed"]["tok"][257:]).any()
    if not cfg.tied:
        assert not np.asarray(grads["head"]["out"]["kernel"][:, 257:]).any()
    logits = M.head_apply(cfg, padded, jnp.ones((1, 1, cfg.d_model)))
    assert np.isneginf(np.asarray(logits[..., 257:])).all()
    back = M.unpad_vocab(cfg, padded)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    embed, _ = outer_params(get_preset("gpt3-175b"), 8)  # GPT-2's 50,257 padded to 51,200
    assert embed == 2048 * 12288 + 51200 * 12288 / 8


@pytest.mark.slow
@needs_devices(8)
@pytest.mark.parametrize("preset,schedule", [("tiny", "1f1b"), ("tiny-llama", "gpipe")])
def test_indivisible_vocabulary_is_padded_split_and_changes_nothing(preset, schedule, tmp_path):
    """V = 257 at tensor 2: the pipeline layout holds 512 rows split 256 per device; losses,
    logits and the canonical state equal the unsplit run's; padded rows stay zero; a checkpoint
    saved at tensor 2 restores at tensor 1 with the canonical 257 rows."""
    cfg = get_preset(preset, num_layers=4, vocab_size=257, tie_embeddings=preset == "tiny")
    runs = {}
    for Tp in (1, 2):
        trainer = _trainer(D=1, S=2, Tp=Tp, schedule=schedule, cfg=cfg)
        state, losses = _losses(trainer, steps=2)
        runs[Tp] = trainer, state, losses
    trainer, state, losses = runs[2]
    np.testing.assert_allclose(losses, runs[1][2], rtol=2e-5)
    tables = [state.params["embed"]["tok"], state.opt_state[1][0].mu["embed"]["tok"]]
    if not cfg.tied:
        tables.append(state.params["head"]["out"]["kernel"].T)
    for table in tables:
        assert table.shape == (512, cfg.d_model)
        assert [s.data.shape[0] for s in table.addressable_shards] == [256] * 4
        assert not np.asarray(table[257:]).any()  # padding never trained
    tokens = np.random.RandomState(1).randint(0, 257, (4, 16)).astype(np.int32)
    logits = {Tp: np.asarray(jax.jit(t.pipe.logits)(s.params, tokens))
              for Tp, (t, s, _) in runs.items()}
    assert logits[2].shape == (4, 16, 257)
    np.testing.assert_allclose(logits[2], logits[1], rtol=2e-4, atol=2e-5)
    canonical = jax.device_get(canonical_state(trainer, state))
    assert canonical["params"]["embed"]["tok"].shape == (257, cfg.d_model)
    with Checkpoints(tmp_path) as c:
        c.save(trainer, state, force=True)
    with Checkpoints(tmp_path) as c:
        restored = c.restore(runs[1][0])
    got = jax.device_get(canonical_state(runs[1][0], restored))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(canonical), strict=True):
        np.testing.assert_array_equal(a, b)


@needs_devices(8)
@pytest.mark.parametrize("embed_head", ["outside", "inside"])
def test_vocabulary_parallel_loss_never_gathers_the_logits(embed_head):
    trainer = _trainer(embed_head=embed_head)
    batch = jax.ShapeDtypeStruct((8, 17), jnp.int32, sharding=trainer.pipe.batch_sharding())
    hlo = trainer.step_fn.lower(trainer.abstract_state(), batch).compile().as_text()
    V = CFG.vocab_size
    gathered = re.findall(rf"= \S+\[[\d,]*\b{V}\b[\d,]*\]\S* all-gather", hlo)
    assert not gathered
    outer = {k: trainer.abstract_state().params[k] for k in ("embed", "head")}
    whole = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(outer))
    assert _bytes_per_device(outer) <= 0.55 * whole


def test_zero1_and_fsdp_must_be_booleans():
    with pytest.raises(ConfigError, match="fsdp must be True or False"):
        PipelineConfig(fsdp="yes")
    with pytest.raises(ConfigError, match="zero1 must be True or False"):
        PipelineConfig(zero1=1)


@pytest.mark.slow
@needs_devices(8)
def test_fsdp_checkpoint_restores_at_other_shapes_and_sharding_modes(tmp_path):
    """Saved with FSDP at data 2 x pipe 2 x tensor 2; restored replicated at pipe 4 x tensor 2
    and with ZeRO-1 at data 4 x pipe 2: the same canonical state, in each trainer's shardings."""
    first = _trainer(fsdp=True)
    state, _ = _losses(first, steps=2)
    want = jax.device_get(canonical_state(first, state))
    with Checkpoints(tmp_path) as c:
        c.save(first, state, force=True)
    for trainer in (_trainer(D=1, S=4, Tp=2), _trainer(D=4, S=2, Tp=1, zero1=True)):
        with Checkpoints(tmp_path) as c:
            restored = c.restore(trainer)
        got = jax.device_get(canonical_state(trainer, restored))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
        for a, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(trainer.shardings),
                         strict=True):
            assert a.sharding.is_equivalent_to(sh, a.ndim)
