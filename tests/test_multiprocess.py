"""Pipelines and checkpoints across processes: local CPU processes with gloo collectives form
one mesh.

Run as a script, this file is the worker of the failure test (`python test_multiprocess.py
worker`): a 2-stage pipeline, one stage per process, stepping until killed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "experiments" / "launch_local.py"
SEQ, BATCH, STEPS = 8, 4, 3
FLAGS = [
    "--model=tiny",
    "--num_layers=4",
    "--num_stages=4",
    "--num_microbatches=2",
    f"--batch_size={BATCH}",
    f"--seq_len={SEQ}",
    f"--steps={STEPS}",
    "--log_every=1",
    "--warmup_steps=1",
    f"--data={ROOT / 'jaxpipe'}",
]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXPIPE_", "XLA_FLAGS"))}
    return {**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **extra}


def _trainer(steps=STEPS, num_stages=4):
    """The Trainer of FLAGS (with `steps` and `num_stages`) on this process's devices."""
    import jax

    from jaxpipe import PipelineConfig, TrainConfig, Trainer, get_preset

    model = get_preset("tiny", num_layers=4)
    pcfg = PipelineConfig(num_stages=num_stages, num_microbatches=2)
    tcfg = TrainConfig(steps=steps, batch_size=BATCH, seq_len=SEQ, warmup_steps=1)
    return Trainer.create(model, pcfg, tcfg, devices=jax.devices()[:num_stages])


def _single_process_run(steps=STEPS):
    """(trainer, losses, final state) of FLAGS trained for `steps` in this one process."""
    from jaxpipe.data import load_data

    trainer = _trainer(steps)
    data = load_data(str(ROOT / "jaxpipe"))
    state, losses = trainer.init_state(), []
    for step in range(steps):
        batch = trainer.put_batch(data.batch(step, BATCH, SEQ, trainer.tcfg.seed))
        state, metrics = trainer.step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    return trainer, losses, state


def _launch(tmp_path, procs, args, logs="logs", timeout_s=400, script=None):
    """Runs train_lm.py (or `script`) ARGS in `procs` processes (4 devices in all); returns
    (stdout, the other processes' logs)."""
    cmd = [
        sys.executable,
        str(LAUNCH),
        f"--num_processes={procs}",
        f"--devices_per_process={4 // procs}",
        f"--log_dir={tmp_path / logs}",
        *([f"--script={script}"] if script else []),
        f"--timeout_s={timeout_s}",
        "--",
        *args,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 50, env=_env())
    others = "".join(p.read_text() for p in sorted((tmp_path / logs).glob("*.log")))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:] + others[-2000:]
    return out.stdout, others


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("procs", [2, 4])
def test_pipe_across_processes_matches_single_process(tmp_path, procs):
    # pipe = 4 spans the processes: with 2 processes x 2 devices, stages 0, 1 run on process 0
    # and stages 2, 3 on process 1; with 4 processes x 1 device, one stage each.
    stdout, logs = _launch(tmp_path, procs, [*FLAGS, f"--workdir={tmp_path / 'run'}"])
    assert f"process 0/{procs} devices" in stdout
    assert f"process 1/{procs} devices" in logs  # process 1's output went to its log, not here
    # Each process times its own CPU devices for the plan's profile, and all take process 0's
    # figures: the predicted times agree to the printed digit in every process.
    predicted = [line for line in stdout.splitlines() if "predicted step" in line]
    assert len(predicted) == 1 and logs.count(predicted[0]) == procs - 1, (predicted, logs)
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # written once, by process 0
    np.testing.assert_allclose(
        [r["loss"] for r in rows], _single_process_run()[1], rtol=1e-5, atol=1e-6
    )


def _flip_bytes_of_largest_array_file(step_dir: Path) -> None:
    """Same length, different content: only the fingerprint can tell."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    f = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x55
    f.write_bytes(bytes(data))


@pytest.mark.slow
def test_checkpoints_across_processes_resume_exactly(tmp_path):
    # 2 processes x 2 devices, pipe = 4 spanning them, save checkpoints 2 and 4 together. The
    # newest is then corrupted: the relaunch must skip it in both processes, move it aside, resume
    # from step 2 and retrace steps 3-4 exactly like one uninterrupted process. The checkpoint
    # it writes must then restore in one process at another pipeline shape.
    import jax

    from jaxpipe.checkpoint import Checkpoints, canonical_state, load_params

    run = tmp_path / "run"
    args = [f for f in FLAGS if not f.startswith("--steps")]
    args += ["--steps=4", "--checkpoint_every=2", "--keep_checkpoints=3", f"--workdir={run}"]
    _launch(tmp_path, 2, args, "logs_a", timeout_s=240)  # a hang fails, not the whole run
    ckpt_dir = run / "checkpoints"
    assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [2, 4]
    _flip_bytes_of_largest_array_file(ckpt_dir / "4")

    stdout, logs = _launch(tmp_path, 2, args, "logs_b", timeout_s=240)
    skipped = f"warning: skipping corrupt checkpoint {ckpt_dir / '4'}"
    assert skipped in stdout and skipped in logs  # verified, and rejected, in both processes
    assert f"resuming from step 2 ({ckpt_dir / '2'})" in stdout
    assert f"moved corrupt checkpoint {ckpt_dir / '4'} to {ckpt_dir / 'corrupt' / '4'}" in stdout
    assert "resuming from" not in logs  # process 0 alone reports
    rows = _metrics(run)  # steps 1-4 of the first launch, 3-4 of the resumed one
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 3, 4]

    trainer, losses, state = _single_process_run(steps=4)
    got = [r["loss"] for r in rows]
    np.testing.assert_allclose(got[:4], losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[4:], losses[2:], rtol=1e-5, atol=1e-6)

    # The multi-process checkpoint 4, restored in this process at 2 stages (and via load_params),
    # holds the uninterrupted run's state: params, AdamW moments and step.
    expected = jax.device_get(canonical_state(trainer, state))
    two_stages = _trainer(steps=4, num_stages=2)
    with Checkpoints(run) as c:
        assert c.steps() == [2, 4]
        restored = c.restore(two_stages)
    assert restored.params["blocks"]["attn"]["q"]["kernel"].shape[0] == 2
    got_state = jax.device_get(canonical_state(two_stages, restored))
    assert int(got_state["step"]) == 4

    def close(path, a, b):
        # The attention key bias has an exactly zero gradient (softmax ignores a shift shared by
        # all keys), so it only moves by AdamW on rounding noise, which depends on the order of
        # the float sums: ~1e-7 either way.
        key = jax.tree_util.keystr(path)
        atol = 1e-6 if "['k']['bias']" in key else 1e-7
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol, err_msg=key)

    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got_state), jax.tree.leaves(expected), strict=True
    ):
        close(path, a, b)
    model, params = load_params(run)
    assert model == two_stages.pipe.model
    for a, (path, b) in zip(
        jax.tree.leaves(params),
        jax.tree_util.tree_leaves_with_path(expected["params"]),
        strict=True,
    ):
        close(path, a, b)

    # load_params reads in the calling process alone: process 1 of 2 calls it, process 0 not.
    _launch(tmp_path, 2, ["load_params", str(run)], "logs_c", timeout_s=120, script=__file__)
    with np.load(run / "loaded.npz") as loaded:
        leaves = [loaded[f"arr_{i}"] for i in range(len(loaded.files))]
    for a, (path, b) in zip(
        leaves, jax.tree_util.tree_leaves_with_path(expected["params"]), strict=True
    ):
        close(path, a, b)


def test_launcher_stops_all_when_one_process_fails(tmp_path):
    script = tmp_path / "fail_on_1.py"
    script.write_text(
        "import os, sys, time\n"
        "if os.environ['JAXPIPE_PROCESS_ID'] == '1':\n    sys.exit(3)\n"
        "time.sleep(600)\n"
    )
    start = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            str(LAUNCH),
            "--num_processes=3",
            "--devices_per_process=1",
            f"--script={script}",
            f"--log_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert out.returncode == 3
    assert "process 1 exited with code 3" in out.stderr
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_survivor_exits_when_a_process_is_killed(tmp_path):
    # No launcher: JAX's own heartbeat check must end the survivor (default 20 s; 10 s here).
    env = _env(
        JAXPIPE_COORDINATOR=f"127.0.0.1:{_free_port()}",
        JAXPIPE_NUM_PROCESSES="2",
        JAXPIPE_HEARTBEAT_TIMEOUT="10",
    )
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-u", __file__, "worker"],
            env={**env, "JAXPIPE_PROCESS_ID": str(i)},
            stdout=open(logs[i], "w"),
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 300
        while "step 2" not in logs[0].read_text():
            assert time.monotonic() < deadline, logs[0].read_text()[-2000:]
            assert procs[0].poll() is None, logs[0].read_text()[-2000:]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = procs[0].wait(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert code != 0
    assert elapsed < 60
    assert "stopped sending heartbeats" in logs[0].read_text()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker():
    import jax

    jax.config.update("jax_num_cpu_devices", 1)
    from jaxpipe.mesh import initialize_distributed

    assert initialize_distributed()
    from jaxpipe import PipelineConfig, TrainConfig, Trainer, get_preset

    model = get_preset("tiny", num_layers=2, max_seq_len=SEQ)
    trainer = Trainer.create(
        model,
        PipelineConfig(num_stages=2, num_microbatches=2),
        TrainConfig(steps=10**6, batch_size=2, seq_len=SEQ),
    )
    state = trainer.init_state()
    batch = trainer.put_batch(np.zeros((2, SEQ + 1), np.int32))
    for step in range(10**6):
        state, metrics = trainer.step_fn(state, batch)
        print(f"step {step} loss {float(metrics['loss']):.4f}", flush=True)


def _load_params_worker(workdir):
    """Process 1 alone loads the newest checkpoint's params and saves them to loaded.npz."""
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    from jaxpipe.mesh import initialize_distributed

    assert initialize_distributed()
    from jax.experimental import multihost_utils

    from jaxpipe.checkpoint import load_params

    if jax.process_index() == 1:
        _, params = load_params(workdir)
        leaves = jax.tree.leaves(params)
        assert all(leaf.devices() == {jax.local_devices()[0]} for leaf in leaves)
        np.savez(Path(workdir) / "loaded.npz", *jax.device_get(leaves))
    multihost_utils.sync_global_devices("loaded")  # process 0 waits for process 1


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _worker()
elif __name__ == "__main__" and sys.argv[1:2] == ["load_params"]:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _load_params_worker(sys.argv[2])


def test_process0_figures_come_back_exactly_with_none_kept():
    from jaxpipe.agree import process0_floats, process0_text

    values = [0.1 + 0.2, None, float("inf"), 3e-300]
    assert process0_floats(values) == (0.1 + 0.2, None, float("inf"), 3e-300)
    assert process0_floats([]) == ()
    assert process0_text("process 0's error") == "process 0's error"


def test_start_up_arguments(monkeypatch):
    from jaxpipe.config import ConfigError
    from jaxpipe.mesh import detected_cluster, initialize_distributed

    for var in (
        "JAXPIPE_COORDINATOR",
        "JAXPIPE_NUM_PROCESSES",
        "JAXPIPE_PROCESS_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(var, raising=False)
    assert detected_cluster() is None
    assert initialize_distributed() is False  # nothing given: one process, nothing started
    monkeypatch.setenv("JAXPIPE_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.setenv("JAXPIPE_NUM_PROCESSES", "2")
    with pytest.raises(ConfigError, match="--process_id"):
        initialize_distributed()
    with pytest.raises(ConfigError, match=r"process_id 2 must be in \[0, 2\)"):
        initialize_distributed(process_id=2)
    monkeypatch.setenv("JAXPIPE_PROCESS_ID", "one")
    with pytest.raises(ConfigError, match="JAXPIPE_PROCESS_ID='one' must be an integer"):
        initialize_distributed()
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert detected_cluster() == "SLURM"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0,t1,t2,t3")
    assert detected_cluster() == "TPU pod"
