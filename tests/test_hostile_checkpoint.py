"""Hostile checkpoints and resumes: a clear error or a warning, never a traceback or lost data.

Unreadable files are simulated by making `open` (the pre-read of every checkpoint file) raise the
OSError that a permission or I/O problem gives, so the tests apply when run as root too;
`test_unreadable_checkpoint_with_real_permissions` drops root's override with `setpriv`.
"""

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxpipe.checkpoint as C
from jaxpipe.checkpoint import (
    CheckpointIOError,
    Checkpoints,
    canonical_state,
    load_params,
    train_resumable,
)
from jaxpipe.config import ConfigError, PipelineConfig, get_preset
from jaxpipe.data import TokenData
from jaxpipe.fingerprint import crc32_fingerprint
from jaxpipe.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent
MODEL = get_preset("tiny", num_layers=2, max_seq_len=16)
TCFG = TrainConfig(steps=6, batch_size=4, seq_len=8, warmup_steps=2, log_every=1, eval_batches=1)
DATA = TokenData(np.random.default_rng(0).integers(0, 256, 4096).astype(np.int32), 256, "random")


def _trainer(tcfg=TCFG, model=MODEL):
    pcfg = PipelineConfig(num_stages=2, num_microbatches=2)
    return Trainer.create(model, pcfg, tcfg, devices=jax.devices()[:2])


@pytest.fixture(scope="module")
def trainer():
    return _trainer()


@pytest.fixture(scope="module")
def at3(trainer):
    """A trainer whose run ends at step 3: resuming from checkpoint 3 trains nothing."""
    return _trainer(dataclasses.replace(TCFG, steps=3))


@pytest.fixture(scope="module")
def base(tmp_path_factory, trainer):
    """A workdir holding checkpoints 3 and 6."""
    workdir = tmp_path_factory.mktemp("base")
    state = trainer.init_state()
    with Checkpoints(workdir, every=3) as c:
        for step in (3, 6):
            c.save(trainer, state.replace(step=state.step * 0 + step))
    return workdir


@pytest.fixture
def work(base, tmp_path):
    shutil.copytree(base, tmp_path / "w")
    return tmp_path / "w"


def _files(d: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(d)), p.stat().st_size) for p in d.rglob("*") if p.is_file())


def _flip(step_dir: Path) -> None:
    f = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
            key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _fail_reads_under(monkeypatch, step_dir: Path, error: OSError) -> None:
    """`open` of any file of step_dir raises `error`, as a permission or disk problem would."""
    real = open

    def fake(path, *args, **kwargs):
        if str(path).startswith(str(step_dir) + os.sep):
            raise error
        return real(path, *args, **kwargs)

    monkeypatch.setattr(C, "open", fake, raising=False)


@pytest.mark.parametrize(
    "error",
    [PermissionError(errno.EACCES, "Permission denied"), OSError(errno.EIO, "I/O error")],
    ids=["permission", "io-error"],
)
def test_unreadable_checkpoint_is_never_touched(work, trainer, monkeypatch, capsys, error):
    step6 = work / "checkpoints" / "6"
    before = _files(step6)
    _fail_reads_under(monkeypatch, step6, error)
    with pytest.raises(CheckpointIOError) as e:
        train_resumable(trainer, DATA, work, every=3)
    msg = str(e.value)
    assert f"cannot read checkpoint {step6} ({type(error).__name__}: " in msg
    assert "it was left untouched" in msg and "\n" not in msg
    assert _files(step6) == before  # nothing deleted, nothing moved
    assert not (work / "checkpoints" / "corrupt").exists()
    # A reader skips it with a warning and uses the previous checkpoint.
    load_params(work)
    assert f"warning: skipping unreadable checkpoint {step6}" in capsys.readouterr().out
    monkeypatch.undo()  # readable again: the run resumes from it
    with Checkpoints(work) as c:
        assert int(c.restore(trainer).step) == 6


def _restore_script(workdir: Path) -> str:
    return (
        "import jax; jax.config.update('jax_num_cpu_devices', 2)\n"
        "from jaxpipe.checkpoint import Checkpoints, CheckpointIOError\n"
        "from jaxpipe.config import PipelineConfig, get_preset\n"
        "from jaxpipe.train import TrainConfig, Trainer\n"
        "t = Trainer.create(get_preset('tiny', num_layers=2, max_seq_len=16),\n"
        "    PipelineConfig(num_stages=2, num_microbatches=2),\n"
        "    TrainConfig(steps=6, batch_size=4, seq_len=8, warmup_steps=2))\n"
        f"c = Checkpoints({str(workdir)!r})\n"
        "try:\n    c.restore(t)\nexcept CheckpointIOError as e:\n    print('error:', e)\n"
    )


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("setpriv") or os.geteuid() != 0, reason="needs root setpriv")
def test_unreadable_checkpoint_with_real_permissions(work):
    state = work / "checkpoints" / "6" / "state"
    before = _files(work / "checkpoints" / "6")
    state.chmod(0)
    try:
        out = subprocess.run(
            ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable,
             "-c", _restore_script(work)],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
        )
    finally:
        state.chmod(0o755)
    assert out.returncode == 0, out.stderr[-3000:]
    step6 = work / "checkpoints" / "6"
    assert f"error: cannot read checkpoint {step6} (PermissionError" in out.stdout
    assert _files(work / "checkpoints" / "6") == before


def test_corrupt_checkpoint_is_moved_aside_not_deleted(work, at3, capsys):
    ck = work / "checkpoints"
    (ck / "corrupt" / "6").mkdir(parents=True)  # an earlier corrupt 6 is kept too
    _flip(ck / "6")
    before = _files(ck / "6")
    summary = train_resumable(at3, DATA, work, every=3)
    assert summary["start_step"] == 3 and not summary["history"]
    out = capsys.readouterr().out
    assert f"warning: skipping corrupt checkpoint {ck / '6'}: fingerprint mismatch" in out
    assert f"moved corrupt checkpoint {ck / '6'} to {ck / 'corrupt' / '6.1'}" in out
    assert _files(ck / "corrupt" / "6.1") == before
    with Checkpoints(work) as c:
        assert c.steps() == [3]  # orbax's step listing ignores checkpoints/corrupt


def test_unfinished_saves_are_removed_at_resume(work, at3, capsys):
    ck = work / "checkpoints"
    tmp = ck / "9.orbax-checkpoint-tmp-1764680000"  # a save killed before its commit
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "partial").write_bytes(b"x" * 100)
    train_resumable(at3, DATA, work, every=3)
    out = capsys.readouterr().out
    assert f"removed unfinished checkpoint saves in {ck}: {tmp.name}" in out
    assert not tmp.exists()
    assert sorted(p.name for p in ck.iterdir()) == ["3", "6"]


def test_missing_array_file_is_one_line(work, trainer, capsys):
    step6 = work / "checkpoints" / "6"
    for f in (step6 / "state" / "d").iterdir():
        f.unlink()
    with Checkpoints(work) as c:
        assert int(c.restore(trainer).step) == 3
    captured = capsys.readouterr()
    warning = [line for line in captured.out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, captured.out
    assert f"checkpoint {step6}: arrays unreadable (NOT_FOUND reading " in warning[0]
    assert str(step6 / "state" / "d") in warning[0] and "tensorstore_spec" not in warning[0]
    assert "Traceback" not in captured.err and "tensorstore_spec" not in captured.err


def _meta_file(ck: Path, step: int) -> Path:
    return ck / str(step) / "meta" / "metadata"


def _edit_meta(ck: Path, step: int, edit) -> None:
    f = _meta_file(ck, step)
    f.write_text(json.dumps(edit(json.loads(f.read_text()))))


def _set(key, value):
    def edit(meta):
        meta[key] = value
        return meta

    return edit


# Each case: (break the workdir, the step restored, the warning or error expected).
CORRUPT_META = {
    "meta JSON is a list": (lambda m: [m], "metadata missing or of an unknown format"),
    "meta JSON is a string": (lambda m: "abc", "metadata missing or of an unknown format"),
    "meta of a future format": (_set("format", 99), "metadata missing or of an unknown format"),
    "meta model of the wrong type": (_set("model", [1, 2]), "metadata malformed"),
    "meta model with an unknown field": (
        lambda m: {**m, "model": {**m["model"], "wings": 2}},
        "metadata malformed",
    ),
    "meta fingerprint of the wrong type": (_set("fingerprint", "abc"), "metadata malformed"),
    "meta seed of the wrong type": (_set("seed", "0"), "metadata malformed"),
    "meta of another step (renamed directory)": (_set("step", 3), "its metadata is of step 3"),
}


@pytest.mark.parametrize("edit,warning", CORRUPT_META.values(), ids=CORRUPT_META.keys())
def test_malformed_metadata_is_corrupt(work, trainer, capsys, edit, warning):
    _edit_meta(work / "checkpoints", 6, edit)
    with Checkpoints(work) as c:
        assert int(c.restore(trainer).step) == 3
    out = capsys.readouterr().out
    assert f"warning: skipping corrupt checkpoint {work / 'checkpoints' / '6'}: {warning}" in out


def _garbage_names(ck: Path) -> None:
    (ck / "foo").mkdir()
    (ck / "7x").mkdir()
    (ck / "8").with_suffix(".bak").mkdir()
    (ck / "run_9").mkdir()
    (ck / "README").write_text("notes")


def test_stray_entries_in_the_checkpoint_directory_are_ignored(work, trainer):
    _garbage_names(work / "checkpoints")
    (work / "checkpoints" / "12").write_text("a file named like a step")
    with Checkpoints(work) as c:
        assert c.steps() == [3, 6]
        assert int(c.restore(trainer).step) == 6


def test_empty_step_directory_is_corrupt(work, trainer, capsys):
    (work / "checkpoints" / "9").mkdir()  # orbax lists it as a step
    with Checkpoints(work) as c:
        assert int(c.restore(trainer).step) == 6
    out = capsys.readouterr().out
    assert f"warning: skipping corrupt checkpoint {work / 'checkpoints' / '9'}: metadata" in out
    print(out)


def test_checkpoint_directory_unreadable(base, monkeypatch):
    def refuse(directory, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(directory))

    monkeypatch.setattr(C.ocp, "CheckpointManager", refuse)
    expected = f"cannot open the checkpoint directory {base / 'checkpoints'} (PermissionError: "
    with pytest.raises(CheckpointIOError, match=expected.replace("(", r"\(")):
        Checkpoints(base)
    with pytest.raises(ConfigError, match="make it readable and writable, or use another"):
        load_params(base)  # sample.py: exit 2


def test_checkpoint_directory_is_a_file(tmp_path, trainer):
    (tmp_path / "checkpoints").write_text("not a directory")
    with pytest.raises(ConfigError, match="checkpoints is a file, not a directory of checkpoints"):
        Checkpoints(tmp_path)
    with pytest.raises(ConfigError, match="is a file"):
        load_params(tmp_path)


@pytest.mark.parametrize("keep", [0, -3])
def test_keep_checkpoints_below_one(tmp_path, keep):
    with pytest.raises(ConfigError, match=f"must be >= 1, got 100 and {keep}"):
        Checkpoints(tmp_path, keep=keep)


def test_keep_checkpoints_huge_keeps_everything(tmp_path, trainer):
    state = trainer.init_state()
    with Checkpoints(tmp_path, every=1, keep=10**9) as c:
        for step in range(1, 5):
            c.save(trainer, state.replace(step=state.step * 0 + step))
        c.wait()
        assert c.steps() == [1, 2, 3, 4]


@pytest.mark.parametrize("field,value", [("batch_size", 8), ("seq_len", 4)])
def test_resume_with_another_batch_shape_is_refused(work, field, value):
    other = _trainer(dataclasses.replace(TCFG, **{field: value}))
    with Checkpoints(work) as c, pytest.raises(ConfigError) as e:
        c.restore(other)
    saved = getattr(TCFG, field)
    assert f"trained with --{field} {saved} but this run uses {value}" in str(e.value)
    assert f"Pass --{field} {saved}" in str(e.value)


def test_restore_of_a_step_that_does_not_exist(work, trainer):
    missing = r"no checkpoint of step 99 .*\[3, 6\]"
    with Checkpoints(work) as c, pytest.raises(ConfigError, match=missing):
        c.restore(trainer, step=99)
    with pytest.raises(ConfigError, match=missing):
        load_params(work, step=99)


def test_load_params_of_a_corrupt_step_is_an_error(work):
    _flip(work / "checkpoints" / "6")
    with pytest.raises(ConfigError, match=r"checkpoints/6 cannot be used: fingerprint mismatch"):
        load_params(work, step=6)


def test_format_1_checkpoint_still_verifies(work, trainer, capsys):
    """Format 1 stored a CRC32 of each whole array: such a checkpoint restores (each array is
    gathered to verify it), and a changed array is still found."""
    ck = work / "checkpoints"
    with Checkpoints(work) as c:
        expected = canonical_state(trainer, c.restore(trainer))
    crcs = crc32_fingerprint(expected)
    _edit_meta(ck, 6, lambda m: {**m, "format": 1, "fingerprint": crcs})
    with Checkpoints(work) as c:
        state = c.restore(trainer)
    assert int(state.step) == 6 and "warning" not in capsys.readouterr().out
    for a, b in zip(jax.tree.leaves(canonical_state(trainer, state)), jax.tree.leaves(expected),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    key = "['params']['blocks']['mlp']['up']['kernel']"
    wrong = {**crcs, key: [*crcs[key][:2], crcs[key][2] ^ 1]}
    _edit_meta(ck, 6, lambda m: {**m, "fingerprint": wrong})
    with Checkpoints(work) as c:
        assert int(c.restore(trainer).step) == 3
    out = capsys.readouterr().out
    assert f"corrupt checkpoint {ck / '6'}: fingerprint mismatch in 1 arrays, e.g. {key}" in out


def test_a_failed_read_in_another_process_is_agreed(work, trainer, monkeypatch, capsys):
    """Each process reads alone, then all agree: here every read succeeds in this process and
    the agreement reports a failure elsewhere (what another process posts)."""
    monkeypatch.setattr(C, "agree_max", lambda code: max(code, 1))  # corrupt elsewhere
    with Checkpoints(work) as c, pytest.raises(ConfigError, match="every checkpoint in"):
        c.restore(trainer)
    out = capsys.readouterr().out
    for step in (6, 3):
        step_dir = work / "checkpoints" / str(step)
        assert f"skipping corrupt checkpoint {step_dir}: it failed to load in another" in out
    monkeypatch.setattr(C, "agree_max", lambda code: max(code, 2))  # unreadable elsewhere
    with Checkpoints(work) as c, pytest.raises(CheckpointIOError) as e:
        c.restore(trainer)
    assert str(e.value).startswith(
        f"cannot read checkpoint {work / 'checkpoints' / '6'} (unreadable in another process); "
        "it was left untouched"
    )
