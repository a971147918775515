"""SIGKILL during training, while a checkpoint save is in flight: the next run loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS, EVERY = 80, 10


def _args(workdir, text):
    return [
        sys.executable,
        str(ROOT / "experiments" / "train_lm.py"),
        "--model=tiny",
        "--num_layers=2",
        "--num_stages=2",
        "--num_microbatches=2",
        "--batch_size=4",
        "--seq_len=16",
        f"--steps={STEPS}",
        f"--checkpoint_every={EVERY}",
        "--keep_checkpoints=3",
        "--log_every=1",
        "--warmup_steps=5",
        f"--data={text}",
        f"--workdir={workdir}",
    ]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _losses(workdir):
    """step -> loss, the last logged value of each step."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _committed(ckdir):
    return sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_sigkill_while_saving_then_resume(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    workdir, ckdir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(_args(workdir, text), env=_env(), stdout=log, stderr=log)
    in_flight = None
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            names = [p.name for p in ckdir.iterdir()] if ckdir.exists() else []
            pending = [n for n in names if "tmp" in n]
            if pending and _committed(ckdir) and _committed(ckdir)[-1] >= 2 * EVERY:
                os.kill(proc.pid, signal.SIGKILL)
                in_flight = pending
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert in_flight, f"no save seen in flight; log:\n{(tmp_path / 'first.log').read_text()}"
    assert proc.returncode == -signal.SIGKILL
    last = _committed(ckdir)[-1]
    before = _losses(workdir)
    assert max(before) > last, "the killed run should have logged steps past its checkpoint"

    done = subprocess.run(
        _args(workdir, text), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from step {last} " in done.stdout
    after = _losses(workdir)  # the resumed run's rows come last, so they win
    assert sorted(after) == list(range(1, STEPS + 1))
    overlap = [s for s in before if s > last]
    # Steps the killed run finished after its checkpoint are recomputed bitwise the same.
    assert [after[s] for s in overlap] == [before[s] for s in overlap]
    print(f"killed with {in_flight} in flight; resumed from {last}; {len(overlap)} steps redone")
    assert _committed(ckdir)[-1] == STEPS
    assert not [p for p in ckdir.iterdir() if "tmp" in p.name]
