"""SIGINT / SIGTERM during training save a checkpoint at a step every process agrees on and exit
with a documented code; a failed save ends the run at once. The next run resumes bitwise."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxpipe.checkpoint import Checkpoints, Interrupted, train_resumable
from jaxpipe.config import PipelineConfig, get_preset
from jaxpipe.data import TokenData
from jaxpipe.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent
MODEL = get_preset("tiny", num_layers=2, max_seq_len=16)
TCFG = TrainConfig(steps=6, batch_size=4, seq_len=8, warmup_steps=2, log_every=1, eval_batches=1)
DATA = TokenData(np.random.default_rng(0).integers(0, 256, 4096).astype(np.int32), 256, "random")


@pytest.fixture(scope="module")
def trainer():
    pcfg = PipelineConfig(num_stages=2, num_microbatches=2)
    return Trainer.create(MODEL, pcfg, TCFG, devices=jax.devices()[:2])


@pytest.fixture(scope="module")
def full(trainer, tmp_path_factory):
    """step -> loss of an uninterrupted run."""
    summary = train_resumable(trainer, DATA, tmp_path_factory.mktemp("full"), every=3)
    return {r["step"]: r["loss"] for r in summary["history"]}


def _signal_at(sig, at_step):
    def on_step(state):
        if int(state.step) == at_step:
            os.kill(os.getpid(), sig)
            os.kill(os.getpid(), sig)  # a second signal while stopping is ignored

    return on_step


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_then_resume_is_bitwise(trainer, full, tmp_path, sig):
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted) as e:
        train_resumable(trainer, DATA, tmp_path, every=3, on_step=_signal_at(sig, 2))
    assert signal.getsignal(sig) is before  # the handlers are put back
    assert e.value.signum == sig and e.value.step == 2
    ckpt = tmp_path / "checkpoints" / "2"
    assert str(e.value) == (
        f"stopped by {sig.name} after step 2: saved checkpoint {ckpt}; rerun the same command "
        f"to resume"
    )
    with Checkpoints(tmp_path) as c:
        assert c.steps() == [2]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # the stopped step's metrics are recorded
    resumed = train_resumable(trainer, DATA, tmp_path, every=3)
    assert resumed["start_step"] == 2
    assert {r["step"]: r["loss"] for r in resumed["history"]} == {s: full[s] for s in (3, 4, 5, 6)}


def test_signal_while_a_save_is_in_flight(trainer, full, tmp_path):
    # Step 3 is a checkpoint step: its async save is in flight when the signal stops the run.
    with pytest.raises(Interrupted, match=r"after step 3: saved checkpoint .*checkpoints/3;"):
        train_resumable(trainer, DATA, tmp_path, every=3, on_step=_signal_at(signal.SIGTERM, 3))
    resumed = train_resumable(trainer, DATA, tmp_path, every=3)
    assert {r["step"]: r["loss"] for r in resumed["history"]} == {s: full[s] for s in (4, 5, 6)}


def test_ignored_signal_stays_ignored(trainer, full, tmp_path):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup / in background
    try:
        summary = train_resumable(trainer, DATA, tmp_path, every=3,
                                  on_step=_signal_at(signal.SIGINT, 2))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert {r["step"]: r["loss"] for r in summary["history"]} == full


def test_signal_before_the_first_step(trainer, tmp_path, monkeypatch):
    # Received while restoring (or compiling): the run stops after its first step and saves it.
    restore = Checkpoints.restore

    def restore_then_signal(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return restore(self, *args, **kwargs)

    monkeypatch.setattr(Checkpoints, "restore", restore_then_signal)
    with pytest.raises(Interrupted, match="stopped by SIGTERM after step 1: saved checkpoint"):
        train_resumable(trainer, DATA, tmp_path, every=3)
    with Checkpoints(tmp_path) as c:
        assert c.steps() == [1]


def test_signal_with_nonfinite_steps_pending_saves_nothing(tmp_path):
    # lr 1e20 from step 1: step 2 onwards is non-finite, so the stop at step 3 has no good state.
    tcfg = dataclasses.replace(TCFG, steps=8, warmup_steps=1, learning_rate=1e20, max_bad_steps=5)
    trainer = Trainer.create(
        MODEL, PipelineConfig(num_stages=2, num_microbatches=2), tcfg, devices=jax.devices()[:2]
    )
    with pytest.raises(Interrupted) as e:
        train_resumable(trainer, DATA, tmp_path, every=1, on_step=_signal_at(signal.SIGINT, 3))
    assert "after step 3: not saved (non-finite steps pending); newest checkpoint" in str(e.value)
    with Checkpoints(tmp_path) as c:
        assert 3 not in c.steps() and all(s < 3 for s in c.steps())


# train_lm.py itself, in a subprocess: real signals, exit codes, one line.

ARGS = [
    "--model=tiny",
    "--num_layers=2",
    "--num_stages=2",
    "--num_microbatches=2",
    "--batch_size=4",
    "--seq_len=8",
    "--steps=40",
    "--checkpoint_every=10",
    "--log_every=1",
    "--warmup_steps=2",
]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXPIPE_", "XLA_FLAGS"))}
    return {**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _text(tmp_path):
    text = tmp_path / "text.txt"
    if not text.exists():
        text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return text


def _train_lm(tmp_path, workdir, extra=(), wrapper=None):
    cmd = [sys.executable, "-u", *([str(wrapper)] if wrapper else []),
           str(ROOT / "experiments" / "train_lm.py"), *ARGS, f"--data={_text(tmp_path)}",
           f"--workdir={workdir}", *extra]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_line(proc, start, timeout_s=300):
    """Reads stdout until a line starts with `start`; returns everything read."""
    lines, deadline = [], time.monotonic() + timeout_s
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(start) or time.monotonic() > deadline:
            break
    return "".join(lines)


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _interrupt(tmp_path, workdir, sig, after_line="step 1/"):
    proc = _train_lm(tmp_path, workdir)
    try:
        head = _wait_for_line(proc, after_line)
        assert after_line in head, head + proc.stderr.read()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, head + out, err


@pytest.mark.slow
def test_train_lm_sigterm_saves_and_exits_143(tmp_path):
    workdir = tmp_path / "run"
    code, out, err = _interrupt(tmp_path, workdir, signal.SIGTERM)
    assert code == 143, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGTERM after step "), err
    step = int(lines[0].split("after step ")[1].split(":")[0])
    assert f"saved checkpoint {workdir / 'checkpoints' / str(step)};" in lines[0]
    assert sorted(_losses(workdir))[-1] == step  # stopped where it says, metrics recorded
    with Checkpoints(workdir, read_only=True) as c:
        assert c.steps()[-1] == step


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_train_lm_signal_before_training(tmp_path, sig):
    # Right after start-up, while planning and compiling: no traceback, nothing half-written.
    code, out, err = _interrupt(tmp_path, tmp_path / "run", sig, after_line="process 0/1")
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    if sig == signal.SIGTERM and not lines:  # before training: the default action, at once
        assert code == -signal.SIGTERM
    else:
        assert code == 128 + sig, err[-3000:]
        assert len(lines) == 1, err
        assert lines[0].startswith(("stopped by", "interrupted (SIGINT) before training started"))


@pytest.mark.slow
def test_train_lm_both_signals_then_resume_bitwise(tmp_path):
    full = tmp_path / "full"
    done = _train_lm(tmp_path, full)
    out, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-3000:]
    expected = _losses(full)

    run = tmp_path / "run"
    code, out, err = _interrupt(tmp_path, run, signal.SIGINT)
    assert code == 130 and "stopped by SIGINT after step " in err and "Traceback" not in err
    first = sorted(_losses(run))[-1]
    code, out, err = _interrupt(tmp_path, run, signal.SIGTERM, after_line=f"step {first + 1}/")
    assert code == 143 and "stopped by SIGTERM after step " in err, err[-3000:]
    assert f"resuming from step {first} " in out
    second = sorted(_losses(run))[-1]
    resumed = _train_lm(tmp_path, run)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming from step {second} " in out
    assert _losses(run) == expected  # every step, resumed twice, bitwise equal
    again = _train_lm(tmp_path, run, ["--steps=30"])
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "done: the checkpoint is at step 40, at or past --steps 30; nothing was trained" in out


FAIL_SAVE = """
import os, runpy, sys

real = os.makedirs


def makedirs(path, *args, **kwargs):  # the save of step 4 fails like a read-only directory
    if os.sep + "4.orbax-checkpoint-tmp" in os.fspath(path):
        raise PermissionError(13, "Permission denied", os.fspath(path))
    return real(path, *args, **kwargs)


os.makedirs = makedirs
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_failed_save_exits_within_30s(tmp_path):
    script = tmp_path / "fail_save.py"
    script.write_text(FAIL_SAVE)
    workdir = tmp_path / "run"
    proc = _train_lm(tmp_path, workdir, ["--checkpoint_every=2", "--steps=400"], script)
    try:
        head = _wait_for_line(proc, "step 4/")
        seen = time.monotonic()
        out, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 4, head + out + err[-3000:]
    assert elapsed < 30
    ck = workdir / "checkpoints"
    assert (
        f"error: could not save checkpoint {ck / '4'} (PermissionError: [Errno 13] Permission "
        f"denied: '{ck / '4.orbax-checkpoint-tmp'}"
    ) in err
    assert f"the newest saved checkpoint is {ck / '2'}" in err
    assert "Traceback" not in err
    with Checkpoints(workdir, read_only=True) as c:
        assert c.steps() == [2]
        assert c.read_meta(2)["step"] == 2  # the last good checkpoint is intact


# Two processes (experiments/launch_local.py): SIGTERM reaches process 1 alone; both stop after
# the same step, save together and exit 143; the relaunch resumes bitwise.

MP_ARGS = ["--num_layers=4", "--num_stages=4", "--steps=24", "--checkpoint_every=10"]


def _launch(tmp_path, workdir, logs):
    cmd = [sys.executable, "-u", str(ROOT / "experiments" / "launch_local.py"),
           "--num_processes=2", "--devices_per_process=2", f"--log_dir={logs}",
           "--timeout_s=400", "--", *ARGS, *MP_ARGS, f"--data={_text(tmp_path)}",
           f"--workdir={workdir}"]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _process(launcher_pid: int, index: int) -> int:
    """The pid of the launcher's child with JAXPIPE_PROCESS_ID=index."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in map(int, children):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"JAXPIPE_PROCESS_ID={index}".encode() in env:
            return pid
    raise AssertionError(f"no process {index} among {children}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_sigterm_to_one_of_two_processes(tmp_path):
    full = tmp_path / "full"
    proc = _launch(tmp_path, full, tmp_path / "logs_full")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    expected = _losses(full)
    assert sorted(expected) == list(range(1, 25))

    run = tmp_path / "run"
    proc = _launch(tmp_path, run, tmp_path / "logs_a")
    try:
        head = _wait_for_line(proc, "step 2/")
        assert "step 2/" in head, head + proc.stderr.read()
        os.kill(_process(proc.pid, 1), signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log1 = (tmp_path / "logs_a" / "process_1.log").read_text()
    assert proc.returncode == 143, head + out + err[-3000:] + log1[-3000:]
    stopped = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stopped) == 1, err[-3000:]
    assert stopped[0] in log1  # both processes stopped after the same step, with one message
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert f"saved checkpoint {run / 'checkpoints' / str(step)};" in stopped[0]

    proc = _launch(tmp_path, run, tmp_path / "logs_b")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert f"resuming from step {step} " in out
    assert _losses(run) == expected  # bitwise
