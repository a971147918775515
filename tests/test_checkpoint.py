"""Checkpoints: restore at any pipeline shape, exact resume, corruption, mismatches, NaN guard."""

import dataclasses
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpipe import model as M
from jaxpipe.checkpoint import (
    Checkpoints,
    _converter,
    _frozen,
    abstract_canonical,
    canonical_shardings,
    canonical_state,
    load_params,
    train_resumable,
)
from jaxpipe.config import ConfigError, PipelineConfig, get_preset
from jaxpipe.data import TokenData
from jaxpipe.fingerprint import crc32_fingerprint, fingerprint
from jaxpipe.train import NonFiniteError, TrainConfig, Trainer, train

MODEL = get_preset("tiny", num_layers=8, max_seq_len=16)  # fills S=4 x R=2 and S=8
SMALL = MODEL.replace(num_layers=4)
TCFG = TrainConfig(steps=6, batch_size=8, seq_len=8, warmup_steps=2, log_every=1, eval_batches=1)
DATA = TokenData(np.random.default_rng(0).integers(0, 256, 4096).astype(np.int32), 256, "random")


def _trainer(S, R=1, data=1, Mb=2, model=MODEL, tcfg=TCFG, tensor=1):
    pcfg = PipelineConfig(
        num_stages=S,
        num_repeats=R,
        num_microbatches=Mb,
        data_parallel=data,
        tensor_parallel=tensor,
        schedule="circular" if R > 1 else "gpipe",
    )
    return Trainer.create(model, pcfg, tcfg, devices=jax.devices()[: S * data * tensor])


def _fake_state(trainer, step):
    """A state whose every optimizer leaf is distinct and non-zero, at `step`."""
    state = trainer.init_state()
    leaves, treedef = jax.tree.flatten(state.opt_state)
    leaves = [a + jnp.asarray(i + 1, a.dtype) for i, a in enumerate(leaves)]
    return state.replace(
        step=jnp.asarray(step, jnp.int32), opt_state=jax.tree.unflatten(treedef, leaves)
    )


def _host(trainer, state):
    return jax.device_get(canonical_state(trainer, state))


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _losses(summary):
    return {row["step"]: row["loss"] for row in summary["history"]}


def test_restore_at_any_shape_round_trip(tmp_path):
    """S=4,R=2 saved; restored at S=2, S=1, data x pipe 2x4 and 1x8; saved at 1x8, restored back."""
    first = _trainer(4, R=2)
    state = _fake_state(first, 3)
    expected = _host(first, state)
    assert float(jnp.abs(expected["opt_state"][1][0].mu["blocks"]["mlp"]["up"]["kernel"]).min()) > 0
    with Checkpoints(tmp_path / "a") as c:
        c.save(first, state, force=True)
    for S, R, D in [(2, 1, 1), (1, 1, 1), (4, 1, 2), (8, 1, 1)]:
        trainer = _trainer(S, R=R, data=D)
        with Checkpoints(tmp_path / "a") as c:
            state = c.restore(trainer)
        assert state.params["blocks"]["attn"]["q"]["kernel"].shape[:2] == (S, R)
        assert state.opt_state[1][0].nu["blocks"]["attn"]["q"]["kernel"].shape[:2] == (S, R)
        assert int(state.step) == 3
        _assert_equal(_host(trainer, state), expected)
    with Checkpoints(tmp_path / "b") as c:  # and back, from the 1 x 8 shape
        c.save(trainer, state, force=True)
    with Checkpoints(tmp_path / "b") as c:
        _assert_equal(_host(first, c.restore(first)), expected)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 6-step run on S=2 and one stopped after step 4 (checkpoint at 3)."""
    root = tmp_path_factory.mktemp("runs")
    trainer = _trainer(2, model=SMALL)
    full = train_resumable(trainer, DATA, root / "full", every=3)

    class Stop(Exception):
        pass

    def stop_at_4(state, count=[0]):  # noqa: B006 - a call counter
        count[0] += 1
        if count[0] == 4:
            raise Stop

    with pytest.raises(Stop):
        train_resumable(trainer, DATA, root / "cut", every=3, on_step=stop_at_4)
    assert Checkpoints(root / "cut").steps() == [3]
    return trainer, _losses(full), root / "cut"


def test_same_seed_same_shape_same_trajectory(runs):
    trainer, full, _ = runs
    again = _losses(train(trainer, DATA))
    assert again == full  # bitwise
    assert full[6] < full[1]


def test_resume_same_shape_is_bitwise(runs, tmp_path):
    trainer, full, cut = runs
    shutil.copytree(cut, tmp_path / "w")
    resumed = train_resumable(trainer, DATA, tmp_path / "w", every=3)
    assert resumed["start_step"] == 3
    assert _losses(resumed) == {s: full[s] for s in (4, 5, 6)}


@pytest.mark.parametrize(
    "S,R,D",
    [(1, 1, 1), pytest.param(2, 2, 2, marks=pytest.mark.slow)],
    ids=["unpipelined", "data2xcirc2x2"],
)
def test_resume_other_shape_matches(runs, tmp_path, S, R, D):
    _, full, cut = runs
    shutil.copytree(cut, tmp_path / "w")
    trainer = _trainer(S, R=R, data=D, model=SMALL)
    resumed = _losses(train_resumable(trainer, DATA, tmp_path / "w", every=3))
    assert sorted(resumed) == [4, 5, 6]
    np.testing.assert_allclose(
        [resumed[s] for s in (4, 5, 6)], [full[s] for s in (4, 5, 6)], rtol=2e-5
    )


@pytest.fixture(scope="module")
def small():
    return _trainer(2, model=SMALL)


def _two_checkpoints(tmp_path, trainer):
    with Checkpoints(tmp_path, every=3) as c:
        for step in (3, 6):
            c.save(trainer, _fake_state(trainer, step))
    return trainer


def _corrupt_data(step_dir: Path):
    files = sorted((step_dir / "state" / "d").rglob("*"))
    files = [f for f in files if f.is_file()]
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_bytes(step_dir: Path):
    """Same length, different content: only the fingerprint can tell."""
    f = max(
        (p for p in (step_dir / "state" / "d").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x55
    f.write_bytes(bytes(data))


def _break_meta(step_dir: Path):
    (step_dir / "meta" / "metadata").write_text("{not json")


@pytest.mark.parametrize(
    "corrupt", [_corrupt_data, _flip_bytes, _break_meta], ids=["truncated", "flipped", "meta"]
)
def test_corrupt_checkpoint_is_skipped_with_warning(tmp_path, capsys, corrupt, small):
    trainer = _two_checkpoints(tmp_path, small)
    corrupt(tmp_path / "checkpoints" / "6")
    with Checkpoints(tmp_path) as c:
        state = c.restore(trainer)
    assert int(state.step) == 3
    out = capsys.readouterr().out
    assert f"skipping corrupt checkpoint {tmp_path / 'checkpoints' / '6'}" in out
    _assert_equal(_host(trainer, state), _host(trainer, _fake_state(trainer, 3)))


def test_other_model_shape_is_a_clear_error(tmp_path, small):
    _two_checkpoints(tmp_path, small)
    wide = _trainer(2, model=SMALL.replace(d_model=64))
    with Checkpoints(tmp_path) as c, pytest.raises(ConfigError) as e:
        c.restore(wide)
    msg = str(e.value)
    assert "d_model 32 vs 64" in msg and "d_model 32," in msg and "d_model 64," in msg


def test_other_seed_is_a_clear_error(tmp_path, small):
    _two_checkpoints(tmp_path, small)
    other = _trainer(2, model=SMALL, tcfg=dataclasses.replace(TCFG, seed=7))
    with Checkpoints(tmp_path) as c, pytest.raises(ConfigError, match="seed 0 .* seed 7"):
        c.restore(other)


def test_keeps_last_k(tmp_path, small):
    trainer = small
    with Checkpoints(tmp_path, every=1, keep=2) as c:
        for step in (1, 2, 3, 4):
            assert c.save(trainer, _fake_state(trainer, step))
        c.wait()
        assert c.steps() == [3, 4]
        assert not c.save(trainer, _fake_state(trainer, 5).replace(bad_steps=jnp.asarray(1)))


def test_load_params_for_the_reference_model(tmp_path, small):
    trainer = _two_checkpoints(tmp_path, small)
    model, params = load_params(tmp_path)
    assert model == SMALL
    state = _fake_state(trainer, 6)
    tokens = jnp.asarray(DATA.batch(0, 8, 8, 0))
    ref = M.reference_loss(model, params, tokens)
    np.testing.assert_allclose(
        float(ref), float(jax.jit(trainer.pipe.loss)(state.params, tokens)), rtol=1e-6
    )
    with pytest.raises(ConfigError, match="no checkpoint"):
        load_params(tmp_path / "empty")


def test_nonfinite_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    # Warmup gives lr 0 at step 0 and 1e20 from step 1: step 2's loss is non-finite for good.
    tcfg = TrainConfig(
        steps=12,
        batch_size=4,
        seq_len=8,
        warmup_steps=1,
        learning_rate=1e20,
        log_every=1,
        eval_batches=1,
        max_bad_steps=2,
    )
    trainer = _trainer(1, Mb=1, model=SMALL.replace(num_layers=2), tcfg=tcfg)
    with pytest.raises(NonFiniteError) as e:
        train_resumable(trainer, DATA, tmp_path, every=1)
    msg = str(e.value)
    assert "3 consecutive non-finite steps (last at step 5" in msg  # steps 3, 4, 5 skipped
    assert f"Last good checkpoint: {tmp_path / 'checkpoints' / '2'}" in msg
    with Checkpoints(tmp_path) as c:
        assert c.steps()[-1] == 2
        state = c.restore(trainer)
    assert int(state.step) == 2 and int(state.bad_steps) == 0
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(jax.device_get(state.params)))
    # max_bad_steps=0 stops at the first bad step (max_bad_steps is not part of the compiled
    # step, so the same trainer is reused with the new limit).
    trainer.tcfg = dataclasses.replace(tcfg, max_bad_steps=0)
    with pytest.raises(NonFiniteError, match="1 consecutive non-finite steps .last at step 3"):
        train(trainer, DATA)


def test_sample_greedy_matches_reference_and_compiles_once(tmp_path, small):
    from jaxpipe import sampling
    from jaxpipe.data import decode, encode

    _two_checkpoints(tmp_path, small)
    cfg, params = load_params(tmp_path)
    prompt = list(encode("def f("))
    ids = sampling.generate(cfg, params, prompt, 4, temperature=0.0)
    assert len(ids) == 4 and isinstance(decode(ids), str)
    seq = list(prompt)
    for _ in range(4):  # greedy on the growing prefix, without the fixed buffer
        x = M.embed_apply(cfg, params, jnp.asarray([seq]))
        logits = M.head_apply(cfg, params, M.stack_forward(cfg, params["blocks"], x))
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert list(ids) == seq[len(prompt) :]
    compiled = sampling._decode._cache_size()
    hot = sampling.generate(cfg, params, prompt[:3], 5, temperature=1.0, seed=1)
    assert len(hot) == 5 and list(hot) == list(
        sampling.generate(cfg, params, prompt[:3], 5, temperature=1.0, seed=1)
    )
    assert sampling._decode._cache_size() == compiled  # no recompile per prompt or token
    with pytest.raises(ConfigError, match="shorten --prompt"):
        sampling.generate(cfg, params, [1] * cfg.max_seq_len, 4)


def _transfers(monkeypatch) -> list[tuple]:
    """Records (shape, device count) of every jax.Array that jax.device_get or np.asarray
    brings to the host from now on."""
    seen = []
    array_type = type(jnp.zeros(1))
    to_numpy, device_get = array_type.__array__, jax.device_get

    def record(x):
        if isinstance(x, jax.Array):
            seen.append((tuple(x.shape), len(x.sharding.device_set)))

    def as_numpy(self, *args, **kwargs):
        record(self)
        return to_numpy(self, *args, **kwargs)

    def get(tree):
        jax.tree.map(record, tree)
        return device_get(tree)

    monkeypatch.setattr(array_type, "__array__", as_numpy)
    monkeypatch.setattr(jax, "device_get", get)
    return seen


@pytest.fixture(scope="module")
def cube():
    """A 2 stages x 2 data x 2 tensor trainer on the 8 devices and a state of step 3."""
    trainer = _trainer(2, data=2, tensor=2)
    return trainer, _fake_state(trainer, 3)


def test_save_never_gathers_a_whole_array(tmp_path, monkeypatch, cube):
    trainer, state = cube
    tree = canonical_state(trainer, state)
    up = tree["opt_state"][1][0].mu["blocks"]["mlp"]["up"]["kernel"]  # [L, D, F]
    assert up.sharding.spec == P("pipe", None, "tensor")  # the trainer's split, in [L, ...]
    assert {s.data.shape for s in up.addressable_shards} == {(4, 32, 32)}  # of (8, 32, 64)
    split = {  # global shapes of the leaves no single device holds whole
        tuple(a.shape)
        for a in jax.tree.leaves(tree)
        if max(s.data.size for s in a.addressable_shards) < a.size
    }
    assert (8, 32, 64) in split
    seen = _transfers(monkeypatch)
    with Checkpoints(tmp_path, async_save=False) as c:
        assert c.save(trainer, state, force=True)
    assert (tmp_path / "checkpoints" / "3").is_dir()
    gathered = [(shape, n) for shape, n in seen if n > 1 and shape in split]
    assert not gathered, gathered
    crc32_fingerprint(tree)  # the format-1 fingerprint gathers: what the check above catches
    assert any(n > 1 and shape in split for shape, n in seen)


def test_fingerprint_is_the_same_at_every_sharding():
    mesh = jax.make_mesh((2, 2, 2), ("a", "b", "c"))
    x = np.random.default_rng(0).standard_normal((8, 4, 8)).astype(np.float32)
    specs = [P(), P("a"), P("a", "b", "c"), P(None, ("a", "b")), P("c", None, ("a", "b"))]
    placed = [jax.device_put(x, NamedSharding(mesh, spec)) for spec in specs]
    prints = [fingerprint({"x": a}) for a in [*placed, jnp.asarray(x), x]]
    assert all(p == prints[0] for p in prints)
    assert prints[0]["['x']"][:2] == [[8, 4, 8], "float32"]
    one_ulp = x.copy()
    one_ulp[5, 3, 1] = np.nextafter(x[5, 3, 1], np.inf)
    swapped = x.copy()
    swapped[0, 0, 0], swapped[7, 3, 7] = x[7, 3, 7], x[0, 0, 0]
    moved = np.roll(x, 1, axis=2)  # the same values elsewhere
    others = [fingerprint({"x": jax.device_put(y, placed[2].sharding)}) for y in
              (one_ulp, swapped, moved)]
    assert len({o["['x']"][2] for o in [prints[0], *others]}) == 4
    small = {"b": jnp.ones(3, jnp.bfloat16), "i": jnp.int32(7), "e": jnp.zeros((0, 2))}
    got = fingerprint(small)
    assert got["['e']"] == [[0, 2], "float32", "0" * 16]
    assert got["['b']"] != fingerprint({**small, "b": jnp.ones(3, jnp.bfloat16) * 2})["['b']"]
    assert got["['i']"] != fingerprint({**small, "i": jnp.int32(8)})["['i']"]


def test_save_at_one_mesh_restore_at_others(tmp_path, cube):
    """Saved at 2 stages x 2 data x 2 tensor; restored, each shard read where it is placed, at
    4 stages x 2 tensor and on one device; then one flipped array file is found at any shape."""
    first, state = cube
    expected = _host(first, state)
    with Checkpoints(tmp_path) as c:
        c.save(first, state, force=True)
    four = _trainer(4, tensor=2)
    for trainer in (four, _trainer(1)):
        with Checkpoints(tmp_path) as c:
            shardings = canonical_shardings(trainer)
            target = abstract_canonical(trainer.pipe.model, trainer.tx, shardings)
            _, tree = c.restore_tree(3, target, trainer.pipe.model, TCFG.seed, TCFG)
            restored = c.restore(trainer)
        for a, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
            assert a.sharding == sharding
        _assert_equal(_host(trainer, restored), expected)
        assert jax.tree.leaves(restored) and all(
            a.sharding == s
            for a, s in zip(jax.tree.leaves(restored), jax.tree.leaves(trainer.shardings),
                            strict=True)
        )
    target = abstract_canonical(four.pipe.model, four.tx, canonical_shardings(four))
    up = target["params"]["blocks"]["mlp"]["up"]["kernel"]
    assert up.sharding.spec == P("pipe", None, "tensor")  # 8 layers over 4 stages
    # Stage s holds layers 2s, 2s+1 in both layouts: placing moves no data between devices.
    placing = _converter(four.pipe, False, *_frozen(four.shardings)).lower(target).compile()
    assert "all-gather" not in placing.as_text() and "all-to-all" not in placing.as_text()
    _flip_bytes(tmp_path / "checkpoints" / "3")
    for trainer in (four, first):
        with Checkpoints(tmp_path) as c, pytest.raises(ConfigError, match="every checkpoint"):
            c.restore(trainer)


@pytest.mark.slow
def test_zbv_checkpoint_restores_under_gpipe_and_back(tmp_path):
    """ZB-V holds layers in a V (device d: virtual stages d and 2S - 1 - d); the checkpoint is
    in canonical layer order, so a gpipe trainer reads the same state, and saves it back."""
    pcfg = PipelineConfig(num_stages=2, num_repeats=2, num_microbatches=2, schedule="zbv")
    zbv = Trainer.create(SMALL, pcfg, TCFG, devices=jax.devices()[:2])
    assert zbv.pipe.layout.placement == "vee"
    state = _fake_state(zbv, 3)
    expected = _host(zbv, state)
    with Checkpoints(tmp_path / "a") as c:
        c.save(zbv, state, force=True)
    gpipe = _trainer(2, model=SMALL)
    with Checkpoints(tmp_path / "a") as c:
        restored = c.restore(gpipe)
    _assert_equal(_host(gpipe, restored), expected)
    # Layer 3 (the last) sits on stage 0, repeat 1 under zbv; on stage 1 under gpipe.
    np.testing.assert_array_equal(
        state.params["blocks"]["attn"]["q"]["kernel"][0, 1, 0],
        restored.params["blocks"]["attn"]["q"]["kernel"][1, 0, 1],
    )
    with Checkpoints(tmp_path / "b") as c:
        c.save(gpipe, restored, force=True)
    with Checkpoints(tmp_path / "b") as c:
        _assert_equal(_host(zbv, c.restore(zbv)), expected)
