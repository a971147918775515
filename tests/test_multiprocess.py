"""Pipelines across processes: local CPU processes with gloo collectives form one mesh.

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


def _single_process_losses():
    import jax

    from jaxpipe import PipelineConfig, TrainConfig, Trainer, get_preset
    from jaxpipe.data import load_data

    model = get_preset("tiny", num_layers=4)
    pcfg = PipelineConfig(num_stages=4, num_microbatches=2)
    tcfg = TrainConfig(steps=STEPS, batch_size=BATCH, seq_len=SEQ, warmup_steps=1)
    trainer = Trainer.create(model, pcfg, tcfg, devices=jax.devices()[:4])
    data = load_data(str(ROOT / "jaxpipe"))
    state, losses = trainer.init_state(), []
    for step in range(STEPS):
        batch = trainer.put_batch(data.batch(step, BATCH, SEQ, tcfg.seed))
        state, metrics = trainer.step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("procs", [2, 4])
def test_pipe_across_processes_matches_single_process(tmp_path, procs):
    # pipe = 4 spans the processes: with 2 processes x 2 devices, stages 0, 1 run on process 0
    # and stages 2, 3 on process 1; with 4 processes x 1 device, one stage each.
    cmd = [
        sys.executable,
        str(LAUNCH),
        f"--num_processes={procs}",
        f"--devices_per_process={4 // procs}",
        f"--log_dir={tmp_path / 'logs'}",
        "--timeout_s=400",
        "--",
        *FLAGS,
        f"--workdir={tmp_path / 'run'}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=450, env=_env())
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:] + logs[-2000:]
    assert f"process 0/{procs} devices" in out.stdout
    assert f"process 1/{procs} devices" in logs  # process 1's output went to its log, not here
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # written once, by process 0
    np.testing.assert_allclose(
        [r["loss"] for r in rows], _single_process_losses(), rtol=1e-5, atol=1e-6
    )


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


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _worker()


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
