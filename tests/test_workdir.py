"""Work directories: refused before any expensive work when a run cannot or must not write them,
and locked for a run's whole life so that two runs never interleave their files."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from absl import flags

from jaxpipe import workdir as W
from jaxpipe.config import ConfigError, get_preset
from jaxpipe.data import TokenData, load_data

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import train_lm  # noqa: E402

TINY_FLAGS = [
    "--model=tiny", "--num_layers=4", "--num_stages=2", "--data_parallel=4", "--devices=8",
    "--num_microbatches=2", "--batch_size=8", "--seq_len=16", "--steps=2", "--log_every=1",
    "--checkpoint_every=2", "--device_profile=h100",
]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _train_lm(*args):
    """train_lm.run() in this process with TINY_FLAGS + args."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train_lm.py", *TINY_FLAGS, *args])
    try:
        train_lm.run(["train_lm.py"])
    finally:
        flags.FLAGS.unparse_flags()


@pytest.fixture
def no_planning(monkeypatch):
    """Fails the test if a run gets as far as device set-up or planning."""

    def reached(*a, **k):
        raise AssertionError("the run started device set-up or planning")

    monkeypatch.setattr("jaxpipe.mesh.initialize_distributed", reached)
    monkeypatch.setattr("jaxpipe.partition.make_plan", reached)


def _run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / W.LOCK_NAME).write_text("")
    return run


def _hf_dir(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    (hf / "model.safetensors").write_bytes(b"\0" * 8)
    return hf


def _raise(err):
    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    return fail


# name -> (setup(tmp_path, monkeypatch) -> workdir, message pattern)
CASES = {
    "empty": (lambda t, m: "", r"--workdir is empty or blank \(''\); give a directory"),
    "blank": (lambda t, m: "   ", r"--workdir is empty or blank"),
    "unexpanded tilde": (lambda t, m: "~/runs/x", r"starts with '~', which the shell did not"),
    "NUL byte": (lambda t, m: f"{t}/a\0b", "contains a NUL byte"),
    "a file": (lambda t, m: _touch(t / "f"), r"is a file, not a directory; pass another"),
    "symlink to a file": (
        lambda t, m: _link(t / "l", _touch(t / "f")), "is a symlink to a file"),
    "dangling symlink": (
        lambda t, m: _link(t / "l", t / "nowhere"), r"is a symlink to .*nowhere, which does not"),
    "under a file": (lambda t, m: _touch(t / "f") / "run", r"lies under .*/f, which is a file"),
    "under /proc": (lambda t, m: "/proc/jaxpipe-run", "is under /proc, a kernel file system"),
    "under /sys": (lambda t, m: "/sys/jaxpipe-run", "is under /sys, a kernel file system"),
    "inside a run's checkpoints/": (
        lambda t, m: _run_dir(t) / "checkpoints" / "x", r"lies inside .*/run/checkpoints, the"),
    "unrelated files": (
        lambda t, m: _touch(t / "config.json").parent,
        r"already holds files that are not from a jaxpipe run \('config.json'\)"),
    "current directory with unrelated files": (
        lambda t, m: (_touch(t / "notes.txt"), m.chdir(t), ".")[2],
        r"--workdir .* already holds files that are not from a jaxpipe run \('notes.txt'\)"),
    "a Hugging Face checkpoint directory": (
        lambda t, m: _hf_dir(t), r"not from a jaxpipe run \('config.json', 'model.safetensors'"),
    "metrics.jsonl a directory": (
        lambda t, m: _mkdir(_run_dir(t) / "metrics.jsonl").parent,
        r"run/metrics.jsonl is not a regular file; remove it or pass another --workdir"),
    "config.json a dangling symlink": (
        lambda t, m: _link(_run_dir(t) / "config.json", t / "gone").parent,
        "config.json is a dangling symlink"),
    "lock file a directory": (
        lambda t, m: _mkdir(t / "run" / W.LOCK_NAME).parent, r".jaxpipe.lock is not a regular"),
    "checkpoints a file": (
        lambda t, m: _touch(_mkdir(t / "run") / "checkpoints").parent,
        "checkpoints is not a directory"),
    "metrics.jsonl not writable": (
        lambda t, m: _deny(m, _touch(_run_dir(t) / "metrics.jsonl")).parent,
        "metrics.jsonl is not writable by this user; fix its permissions"),
    "workdir not writable": (
        lambda t, m: _deny(m, _mkdir(t / "ro")), r"ro is not writable by this user"),
    "parent not writable": (
        lambda t, m: (m.setattr(Path, "mkdir", _raise(errno.EACCES)), t / "new")[1],
        "cannot create --workdir .*/new: Permission denied"),
    "disk full at mkdir": (
        lambda t, m: (m.setattr(Path, "mkdir", _raise(errno.ENOSPC)), t / "new")[1],
        "cannot create --workdir .*/new: No space left on device"),
    "name too long": (lambda t, m: t / ("x" * 300), "cannot create --workdir .*: File name too"),
}


def _touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("x")
    return p


def _mkdir(p):
    p.mkdir(parents=True)
    return p


def _link(p, target):
    p.symlink_to(target)
    return p


def _deny(monkeypatch, path):
    """As root, permission bits do not apply: `os.access` says no for `path`."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != path and real(p, mode))
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_bad_workdir(name, tmp_path, monkeypatch):
    setup, pattern = CASES[name]
    workdir = setup(tmp_path, monkeypatch)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=pattern):
        W.check_workdir(workdir)
    if name not in ("parent not writable", "disk full at mkdir"):
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("name", ["a file", "unrelated files", "under /proc", "empty"])
def test_train_lm_refuses_before_planning(name, tmp_path, monkeypatch, no_planning):
    workdir = CASES[name][0](tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match=CASES[name][1]):
        _train_lm(f"--workdir={workdir}")


def test_good_workdirs_are_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert W.check_workdir("runs/rel") == tmp_path / "runs" / "rel"  # relative to the cwd
    assert W.check_workdir("runs/my run ü 日本").is_dir()  # spaces and unicode
    (tmp_path / "empty").mkdir()
    assert W.check_workdir("empty") == tmp_path / "empty"
    run = _run_dir(tmp_path)
    _touch(run / "metrics.jsonl")
    assert W.check_workdir(run) == run  # a previous run's directory: resumed
    old = _mkdir(tmp_path / "old")  # a run from before the lock file existed
    _touch(old / "config.json"), _touch(old / "plan.json")
    assert W.check_workdir(old) == old
    target = _mkdir(tmp_path / "target")
    assert W.check_workdir(_link(tmp_path / "via", target)) == tmp_path / "via"


def test_lock_records_holder_and_refuses_a_second_holder(tmp_path):
    with W.lock_workdir(tmp_path) as lock:
        saved = json.loads((tmp_path / W.LOCK_NAME).read_text())
        assert saved["pid"] == os.getpid() and saved["host"] == socket.gethostname()
        with pytest.raises(W.WorkdirBusy, match=f"pid {os.getpid()} on host "):
            W.lock_workdir(tmp_path)  # a second open file: flock refuses it as for a process
        assert lock.held
    assert (tmp_path / W.LOCK_NAME).read_text() == ""  # released: marked as ended
    with W.hold_workdir(tmp_path) as lock:  # the form runs use (one process here)
        assert lock.held
        with pytest.raises(W.WorkdirBusy, match="wait for it to finish, stop it, or pass"):
            with W.hold_workdir(tmp_path):
                pass
    assert not lock.held


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    (tmp_path / W.LOCK_NAME).write_text('{"pid": 999999, "host": "gone", "started": "then"}')
    with W.lock_workdir(tmp_path):
        assert json.loads((tmp_path / W.LOCK_NAME).read_text())["pid"] == os.getpid()
    note = "pid 999999 on host gone (started then)) ended without releasing"
    assert note in capsys.readouterr().out
    (tmp_path / W.LOCK_NAME).write_text("garbage{")
    W.lock_workdir(tmp_path).release()  # unreadable content: not an obstacle


@pytest.mark.parametrize(
    "name,patch,pattern",
    [
        ("disk full", ("os.pwrite", errno.ENOSPC), "cannot write the lock file .*: No space left"),
        ("no locks", ("fcntl.flock", errno.ENOLCK), "cannot lock .*: No locks available; pass a"),
    ],
)
def test_lock_file_errors(name, patch, pattern, tmp_path, monkeypatch):
    monkeypatch.setattr(patch[0], _raise(patch[1]))
    with pytest.raises(ConfigError, match=pattern):
        W.lock_workdir(tmp_path)


def test_lock_file_symlink_is_refused(tmp_path):
    _link(tmp_path / W.LOCK_NAME, _touch(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="cannot open the lock file .*: it is a symlink"):
        W.lock_workdir(tmp_path)


def test_write_text_disk_full(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_text", _raise(errno.ENOSPC))
    with pytest.raises(ConfigError, match="cannot write .*config.json: No space left on device"):
        W.write_text(tmp_path / "config.json", "{}")


def test_another_model_in_the_workdir(tmp_path):
    tiny = get_preset("tiny", num_layers=4)
    (tmp_path / "config.json").write_text(json.dumps({"model": tiny.__dict__}))
    W.check_same_model(tmp_path, tiny.replace(name="renamed"))  # the name does not matter
    with pytest.raises(ConfigError, match="differs in num_layers 4 vs 6\\); use the same model"):
        W.check_same_model(tmp_path, tiny.replace(num_layers=6))


def test_sample_workdir_checks(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass the --workdir of a training run"):
        W.check_run_dir(tmp_path / "none")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        W.check_run_dir(_touch(tmp_path / "f"))
    with pytest.raises(ConfigError, match="is empty or blank"):
        W.check_run_dir("")
    assert W.check_run_dir(tmp_path) == tmp_path


def test_data_that_is_not_a_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # reading it would block forever
    for path in (tmp_path / "fifo", "/dev/zero"):
        with pytest.raises(ConfigError, match="is not a regular file or a directory"):
            load_data(str(path))
    _touch(tmp_path / "d" / "ids.bin")  # a directory without text files
    with pytest.raises(ConfigError, match="is a directory with no text files"):
        load_data(str(tmp_path / "d"))


def test_data_too_short_for_eval_fails_before_planning(tmp_path, monkeypatch):
    data = TokenData(np.arange(600, dtype=np.int32) % 256, 256, "ids")  # 12 eval tokens
    data.check(8)
    with pytest.raises(ConfigError, match="eval data from ids has 12 tokens, fewer than seq_len"):
        data.check(16)
    short = tmp_path / "short.txt"
    short.write_bytes(bytes(range(32, 127)) * 8)  # 760 bytes: 16 eval tokens, < 18
    monkeypatch.setattr("jaxpipe.partition.make_plan", lambda *a, **k: 1 / 0)
    with pytest.raises(ConfigError, match="eval data from .*short.txt has 16 tokens"):
        _train_lm(f"--workdir={tmp_path / 'run'}", f"--data={short}")


def _hold_in_another_process(workdir):
    """A second process that holds the workdir's lock until killed; returns it once locked."""
    code = ("import sys, time; from jaxpipe.workdir import lock_workdir\n"
            "lock = lock_workdir(sys.argv[1]); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(workdir)], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_run_refused_while_another_process_holds_the_workdir(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = _hold_in_another_process(workdir)
    try:
        t0 = time.perf_counter()
        with pytest.raises(W.WorkdirBusy, match=f"in use by another run: pid {holder.pid} on "
                                                f"host {socket.gethostname()}"):
            _train_lm(f"--workdir={workdir}")
        assert time.perf_counter() - t0 < 5  # at once, not after planning or training
        assert sorted(p.name for p in workdir.iterdir()) == [W.LOCK_NAME]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with W.lock_workdir(workdir) as lock:  # the killed holder's lock file is no obstacle
        assert lock.holder.pid == os.getpid()


def test_empty_workdir_flag_leaves_the_current_directory_alone(tmp_path):
    (tmp_path / "config.json").write_text('{"mine": 1}')
    cmd = [sys.executable, str(ROOT / "experiments" / "train_lm.py"), "--workdir=", *TINY_FLAGS]
    done = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("error: --workdir is empty or blank")
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert (tmp_path / "config.json").read_text() == '{"mine": 1}'


@pytest.mark.slow
def test_two_concurrent_runs_on_one_workdir(tmp_path):
    """Run A trains; run B, started on the same workdir meanwhile, exits 2 at once naming A and
    writes nothing; after A is SIGKILLed, run C takes the workdir over."""
    workdir = tmp_path / "run"
    base = [sys.executable, str(ROOT / "experiments" / "train_lm.py"), *TINY_FLAGS[:3],
            "--num_microbatches=2", "--batch_size=4", "--seq_len=16", "--log_every=1",
            "--checkpoint_every=50", f"--workdir={workdir}"]
    a = subprocess.Popen([*base, "--steps=400"], env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        metrics = workdir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text()):  # A holds the lock and trains
            assert a.poll() is None and time.time() < deadline, a.stdout.read()[-3000:]
            time.sleep(0.2)
        t0 = time.perf_counter()
        b = subprocess.run([*base, "--steps=400", "--learning_rate=1e-3"], env=_env(),
                           capture_output=True, text=True, timeout=120)
        assert b.returncode == 2, b.stderr[-2000:]
        assert f"in use by another run: pid {a.pid} on host {socket.gethostname()}" in b.stderr
        assert time.perf_counter() - t0 < 30 and "Traceback" not in b.stderr
        assert a.poll() is None  # A is still training, undisturbed
    finally:
        a.kill()
        a.wait()
    rows = [json.loads(r)["step"] for r in metrics.read_text().splitlines()]
    assert rows == list(range(1, len(rows) + 1))  # A's rows only, once each
    assert json.loads((workdir / "config.json").read_text())["train"]["learning_rate"] == 3e-3
    c = subprocess.run([*base, "--steps=2"], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert c.returncode == 0, c.stderr[-3000:]
    assert f"previous run in {workdir} (pid {a.pid} on host" in c.stdout


@pytest.mark.slow
def test_two_process_run_refused_when_process_0_cannot_lock(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = _hold_in_another_process(workdir)
    try:
        cmd = [sys.executable, str(ROOT / "experiments" / "launch_local.py"),
               "--num_processes=2", "--devices_per_process=1", f"--log_dir={tmp_path / 'logs'}",
               "--timeout_s=120", "--", "--model=tiny", "--num_layers=4", "--num_stages=2",
               "--num_microbatches=2", "--batch_size=4", "--seq_len=16", "--steps=2",
               f"--workdir={workdir}"]
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=170)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    others = (tmp_path / "logs" / "process_1.log").read_text()
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:] + others[-2000:]
    busy = f"is in use by another run: pid {holder.pid}"
    assert f"error: --workdir {workdir} {busy}" in done.stderr
    assert f"error: process 0: --workdir {workdir} {busy}" in others  # agreed, not hung
    assert sorted(p.name for p in workdir.iterdir()) == [W.LOCK_NAME]


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--devices=0"], r"--devices must be >= 1, got 0"),
        (["--num_stages=99999999999999999999"], r"would force .* CPU devices .* at most 1024"),
        (["--num_stages=0"], r"num_stages must be a positive integer"),
    ],
)
def test_train_lm_device_counts_are_checked_before_device_setup(
    args, pattern, tmp_path, no_planning
):
    flags.FLAGS.unparse_flags()
    no_devices = [f for f in TINY_FLAGS if not f.startswith("--devices")]
    flags.FLAGS(["train_lm.py", *no_devices, f"--workdir={tmp_path / 'run'}", *args])
    try:
        with pytest.raises(ConfigError, match=pattern):
            train_lm.run(["train_lm.py"])
    finally:
        flags.FLAGS.unparse_flags()
