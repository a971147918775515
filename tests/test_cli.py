"""The command-line tools under hostile input: every bad value is one `error:` line, status 2.

In-process calls of each tool's `main(argv)` (python -m jaxpipe.schedule, python -m
jaxpipe.plan, experiments/launch_local.py) plus a few subprocess runs of the absl scripts, whose
flag parsing happens before `main`.
"""

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from absl import flags

from jaxpipe import cli, schedule
from jaxpipe import plan as plan_cli
from jaxpipe import viz as schedule_cli
from jaxpipe.config import ConfigError, PipelineConfig, check_tensor_parallel, get_preset
from jaxpipe.mesh import initialize_distributed, split_address, wait_for_coordinator
from jaxpipe.partition import make_plan
from jaxpipe.schedule import MAX_TABLE_CELLS, build_table, full_table, ring_table, table_cells

ROOT = Path(__file__).resolve().parent.parent


def _load_launch_local():
    spec = importlib.util.spec_from_file_location(
        "launch_local", ROOT / "experiments" / "launch_local.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch_local = _load_launch_local()
TOOLS = {"schedule": schedule_cli.main, "plan": plan_cli.main, "launch": launch_local.main}


def _call(main, argv, capsys):
    """(exit status, stdout, stderr) of main(argv), whether it returns or exits."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def _png_ops_over_limit():
    micro = schedule.MAX_CHART_OPS // 8 + 1  # 2 x 4 stages x micro ops > the limit
    return ["--stages", "4", "--microbatches", str(micro), "--png", "x.png"]


# (tool, argv, message regex). Each must exit 2 with exactly one line on stderr: `error: ...`.
CASES = {
    # python -m jaxpipe.schedule
    "schedule interleaved M not a multiple of S": (
        "schedule",
        "--schedule interleaved_1f1b --stages 4 --microbatches 6 --repeats 2",
        r"num_microbatches 6 must be a multiple of num_stages 4; try 8",
    ),
    "schedule zero stages": ("schedule", "--stages 0", r"must be >= 1, got 0, 8, 1"),
    "schedule negative micro-batches": (
        "schedule",
        "--microbatches -1",
        r"must be >= 1, got 4, -1, 1",
    ),
    "schedule zero repeats": ("schedule", "--repeats 0", r"must be >= 1, got 4, 8, 0"),
    "schedule gpipe with repeats": (
        "schedule",
        "--schedule gpipe --repeats 2",
        r"schedule 'gpipe' runs each stage once .* use circular for repeats",
    ),
    "schedule png in a missing directory": (
        "schedule",
        "--png /nonexistent/dir/x.png",
        r"--png '/nonexistent/dir/x.png': directory '/nonexistent/dir' does not exist",
    ),
    "schedule trace to a directory": (
        "schedule",
        "--trace {tmp}",
        r"--trace '.*' is a directory; give a file path inside it",
    ),
    "schedule huge table": (
        "schedule",
        "--schedule gpipe --stages 1000 --microbatches 100000",
        r"needs a table of 201,998,000 \(tick, stage\) cells, over the limit of 1,000,000",
    ),
    "schedule unknown schedule": (
        "schedule",
        "--schedule zigzag",
        r"argument --schedule: invalid choice: 'zigzag'.*; see python -m jaxpipe.schedule --help",
    ),
    "schedule stages not a number": (
        "schedule",
        "--stages abc",
        r"argument --stages: invalid int value: 'abc'",
    ),
    "schedule unknown flag": ("schedule", "--stage 3", r"unrecognized arguments: --stage 3"),
    "schedule png not a .png": (
        "schedule",
        "--png {tmp}/chart.txt",
        r"--png '.*chart.txt' must name a .png file",
    ),
    "schedule png empty path": ("schedule", ["--png", ""], r"--png is empty; give a file path"),
    "schedule png of too many ops": (
        "schedule",
        _png_ops_over_limit(),
        r"--png draws one box per op, at most 2,048 .* use --trace",
    ),
    "schedule trace unwritable at write time": (
        "schedule",
        "--trace /proc/jaxpipe_trace.json",
        r"cannot write --trace '/proc/jaxpipe_trace.json': No such file or directory",
    ),
    # python -m jaxpipe.plan
    "plan zero batch": ("plan", "--model tiny --batch_size 0", r"batch size 0 must be a positive"),
    "plan tensor parallel not dividing heads": (
        "plan",
        "--model tiny --tensor_parallel 3",
        r"tensor_parallel=3 must divide num_heads=4 of model 'tiny' .* in \[1, 2, 4\]",
    ),
    "plan tensor parallel not dividing kv heads": (
        "plan",
        "--model tiny-llama --tensor_parallel 4",
        r"tensor_parallel=4 must divide num_kv_heads=2",
    ),
    "plan negative seq_len": ("plan", "--model tiny --seq_len -1", r"--seq_len must be >= 1"),
    "plan zero seq_len": ("plan", "--model tiny --seq_len 0", r"--seq_len must be >= 1, got 0"),
    "plan unknown dtype": (
        "plan",
        "--model tiny --dtype bogus",
        r"--dtype 'bogus' is not a compute dtype; use one of \('float32', 'bfloat16'",
    ),
    "plan integer dtype": ("plan", "--model tiny --dtype int8", r"--dtype 'int8' is not a"),
    "plan 8-bit float dtype": (
        "plan",
        "--model tiny --dtype float8_e4m3fn",
        r"--dtype 'float8_e4m3fn' is not a compute dtype",
    ),
    "plan negative batch": ("plan", "--model tiny --batch_size -4", r"batch size -4 must be"),
    "plan zero repeats": ("plan", "--model tiny --repeats 0", r"num_repeats must be a positive"),
    "plan zero data parallel": (
        "plan",
        "--model tiny --data_parallel 0",
        r"data_parallel must be a positive integer, got 0",
    ),
    "plan stages not a number": ("plan", "--stages abc", r"argument --stages/--pipe: invalid int"),
    "plan unknown flag": ("plan", "--model tiny --bogus", r"unrecognized arguments: --bogus"),
    "plan huge stage count": (
        "plan",
        "--model tiny --stages 99999999999",
        r"4 layers cannot fill num_stages x num_repeats = 99999999999 x 1",
    ),
    "plan non-UTF-8 model name": (
        "plan",
        ["--model", os.fsdecode(b"\xff")],
        r"unknown model preset '\\udcff'",
    ),
    # experiments/launch_local.py
    "launch zero processes": ("launch", "--num_processes 0", r"--num_processes must be 1 to 64"),
    "launch negative processes": (
        "launch",
        "--num_processes -1",
        r"--num_processes must be 1 to 64, got -1",
    ),
    "launch too many processes": (
        "launch",
        "--num_processes 100000",
        r"--num_processes must be 1 to 64, got 100000",
    ),
    "launch zero devices": (
        "launch",
        "--devices_per_process 0",
        r"--devices_per_process must be 1 to 256, got 0",
    ),
    "launch huge device count": (
        "launch",
        "--devices_per_process 99999999999",
        r"--devices_per_process must be 1 to 256, got 99999999999",
    ),
    "launch missing script": (
        "launch",
        "--script /nonexistent/train.py",
        r"--script '/nonexistent/train.py' is not a file",
    ),
    "launch log dir is a file": (
        "launch",
        "--log_dir {file}",
        r"--log_dir '.*' is a file; give a directory",
    ),
    "launch nan timeout": ("launch", "--timeout_s nan", r"--timeout_s must be a finite number"),
    "launch negative timeout": ("launch", "--timeout_s -5", r"seconds > 0, got -5.0"),
    "launch processes not a number": (
        "launch",
        "--num_processes abc",
        r"argument --num_processes: invalid int value: 'abc'; see launch_local.py --help",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_exit_2(case, tmp_path, capsys, monkeypatch):
    tool, argv, pattern = CASES[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    if isinstance(argv, str):
        argv = argv.format(tmp=tmp_path, file=tmp_path / "a_file").split()
    start = time.monotonic()
    code, out, err = _call(TOOLS[tool], argv, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert time.monotonic() - start < 5  # refused up front, not after the work
    assert not list(tmp_path.glob("*.png"))  # nothing written


def test_help_exits_0(capsys):
    for main in TOOLS.values():
        code, out, _ = _call(main, ["--help"], capsys)
        assert code == 0 and "usage:" in out


def test_duplicate_flag_last_one_wins(capsys):
    argv = "--stages 2 --microbatches 2 --stages 3".split()
    code, out, _ = _call(schedule_cli.main, argv, capsys)
    assert code == 0 and "S=3 M=2" in out and "stage 2:" in out


def test_long_grid_is_not_printed_unless_asked(capsys):
    argv = ["--stages", "2", "--microbatches", str(schedule_cli.MAX_GRID_TICKS)]
    code, out, _ = _call(schedule_cli.main, argv, capsys)
    assert code == 0 and "not printed (over 400); pass --ascii" in out and "stage 0:" not in out
    code, out, _ = _call(schedule_cli.main, [*argv, "--ascii"], capsys)
    assert code == 0 and "stage 0:" in out


def test_schedule_writes_png_and_trace(tmp_path, capsys):
    png, trace = tmp_path / "g.png", tmp_path / "t.json"
    argv = ["--stages", "2", "--microbatches", "2", "--png", str(png), "--trace", str(trace)]
    code, out, err = _call(schedule_cli.main, argv, capsys)
    assert code == 0, err
    assert png.stat().st_size > 0 and trace.stat().st_size > 0
    assert f"wrote {png}" in out and "stage 0:" not in out


def test_unwritable_png_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    # Permissions do not apply to root, so the check is simulated.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK and real_access(p, mode))
    code, out, err = _call(schedule_cli.main, ["--png", str(tmp_path / "g.png")], capsys)
    assert code == 2 and err.startswith("error: --png") and "is not writable" in err
    assert out == ""


def test_launcher_ctrl_c_stops_processes_cleanly(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "def on_term(*_):\n"
        "    time.sleep(1)  # a save in progress\n"
        "    open(sys.argv[1] + os.environ['JAXPIPE_PROCESS_ID'], 'w').write('saved')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    launcher = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "experiments" / "launch_local.py"),
            "--num_processes=2",
            f"--script={script}",
            f"--log_dir={tmp_path / 'logs'}",
            "--",
            str(tmp_path / "saved_"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert launcher.stdout.readline() == "ready\n"
    deadline = time.monotonic() + 30
    while "ready" not in (tmp_path / "logs" / "process_1.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=30) == 130
    err = launcher.stderr.read()
    assert "interrupted; stopping all processes" in err and "Traceback" not in err
    assert all((tmp_path / f"saved_{i}").read_text() == "saved" for i in range(2))


# -- the table-size bound in the library ----------------------------------------------------


def test_table_builders_refuse_huge_tables_at_once():
    start = time.monotonic()
    for build in (build_table, full_table):
        with pytest.raises(ConfigError, match=r"over the limit of 1,000,000"):
            build("gpipe", 1000, 100_000)
    with pytest.raises(ConfigError, match=r"'1f1b' with 8 stages, 100000 micro-batches"):
        build_table("1f1b", 8, 100_000)
    with pytest.raises(ConfigError, match=r"over the limit"):
        ring_table("circular", 64, 10_000, 4)
    assert time.monotonic() - start < 1


@pytest.mark.parametrize(
    "schedule,S,M,R",
    [("gpipe", 3, 5, 1), ("circular", 4, 2, 3), ("1f1b", 4, 7, 1), ("interleaved_1f1b", 2, 4, 3)],
)
def test_table_cells_is_exact_for_ring_and_a_lower_bound_otherwise(schedule, S, M, R):
    ring = ring_table(schedule, S, M, R) if schedule in ("gpipe", "circular") else None
    if ring is not None:
        assert ring.op.size == table_cells(S, M, R, ring=True)
    full = full_table(schedule, S, M, R)
    assert full.op.size >= table_cells(S, M, R, ring=False)
    assert table_cells(S, M, R, ring=False) <= MAX_TABLE_CELLS


# -- one tensor-parallel check for the planner and the trainer ------------------------------


def test_planner_and_trainer_share_the_tensor_parallel_check(capsys):
    from jaxpipe import placement

    assert placement.check_tensor_parallel is check_tensor_parallel
    with pytest.raises(ConfigError) as raised:
        check_tensor_parallel(get_preset("tiny"), 3)
    code, _, err = _call(plan_cli.main, ["--model", "tiny", "--tensor_parallel", "3"], capsys)
    assert code == 2 and err.strip() == f"error: {raised.value}"
    with pytest.raises(ConfigError, match=re.escape(str(raised.value))):  # before any work
        make_plan(
            get_preset("tiny"), PipelineConfig(tensor_parallel=3), "cost", batch_size=1, seq_len=8
        )
    PipelineConfig(tensor_parallel=3)  # the config alone is fine; the model decides


# -- absl flag parsing (experiments/*.py) ---------------------------------------------------

flags.DEFINE_integer("cli_test_count", 1, "A flag for the tests of cli.parse_absl_flags.")


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["--cli_test_count=abc"], r"flag --cli_test_count=abc: invalid literal for int\(\)"),
        (["--cli_test_cont=3"], r"Unknown command line flag 'cli_test_cont'"),
        (["stray"], r"unexpected arguments \['stray'\]; flags are spelled --name=value"),
    ],
)
def test_absl_flag_errors_exit_2(argv, pattern, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.parse_absl_flags(["prog.py", *argv])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(pattern, err), err
    flags.FLAGS.unparse_flags()


def test_guard_maps_config_error_to_2(capsys):
    def body():
        raise ConfigError("num_stages must be a positive integer, got 0")

    assert cli.guard(body) == 2
    assert capsys.readouterr().err == "error: num_stages must be a positive integer, got 0\n"
    assert cli.guard(lambda: None) == 0 and cli.guard(lambda: 3) == 3


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXPIPE_", "SLURM_"))}
    return {**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **extra}


def _script(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=_env(**(env or {})),
    )


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["--num_stages", "abc"], r"^error: flag --num_stages=abc: invalid literal for int"),
        (["--no_such_flag=1"], r"^error: Unknown command line flag 'no_such_flag'"),
    ],
)
def test_train_lm_flag_errors_exit_2(argv, pattern):
    out = _script("experiments/train_lm.py", *argv)
    assert out.returncode == 2, out.stderr
    assert "FATAL" not in out.stderr and "Traceback" not in out.stderr
    assert re.search(pattern, out.stderr, flags=re.M), out.stderr


def test_train_lm_help_exits_0():
    out = _script("experiments/train_lm.py", "--help")
    assert out.returncode == 0 and "--num_stages" in out.stdout


# -- the coordinator of a multi-process run -------------------------------------------------


def test_unreachable_coordinator_is_a_clear_error():
    address = f"127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(ConfigError) as raised:
        initialize_distributed(address, 2, 1, init_timeout_s=1)
    assert time.monotonic() - start < 5
    assert str(raised.value).startswith(f"cannot reach the coordinator {address} within 1 s (")
    assert "JAXPIPE_INIT_TIMEOUT" in str(raised.value)


def test_unreachable_coordinator_from_train_lm_exits_2_in_seconds():
    address = f"127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    out = _script(
        "experiments/train_lm.py",
        "--model=tiny",
        f"--coordinator={address}",
        "--num_processes=2",
        "--process_id=1",
        env={"JAXPIPE_INIT_TIMEOUT": "1"},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot reach the coordinator {address} within 1 s"
    )
    assert "Check failure" not in out.stderr
    assert time.monotonic() - start < 30


def test_auto_coordinator_outside_a_cluster_exits_2():
    out = _script("experiments/train_lm.py", "--model=tiny", "--coordinator=auto")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        "error: --coordinator auto: JAX detected no cluster environment here"
    )
    assert "Traceback" not in out.stderr


def test_output_closed_early_is_quiet():
    # `python -m jaxpipe.schedule ... | head -1`: the reader goes away mid-grid.
    argv = ["-m", "jaxpipe.schedule", "--stages", "8", "--microbatches", "2000", "--ascii"]
    proc = subprocess.Popen(
        [sys.executable, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=_env(),
    )
    assert proc.stdout.readline().startswith(b"1f1b: S=8 M=2000")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == cli.PIPE_CLOSED
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_reachable_coordinator_passes_the_check():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", 1)


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda: split_address("127.0.0.1"), r"'127.0.0.1' is not host:port"),
        (lambda: split_address("host:99999"), r"'host:99999' is not host:port"),
        (lambda: split_address(":1234"), r"':1234' is not host:port"),
        (
            lambda: wait_for_coordinator("no-such-host.invalid:1234", 5),
            r"cannot resolve the coordinator host 'no-such-host.invalid'",
        ),
        (
            lambda: initialize_distributed("127.0.0.1:1234", 2, 1, init_timeout_s=0),
            r"initialization timeout \(JAXPIPE_INIT_TIMEOUT\) must be > 0 seconds, got 0",
        ),
        (
            lambda: initialize_distributed("127.0.0.1:1234", 2, 1, heartbeat_timeout_s=0),
            r"heartbeat timeout \(JAXPIPE_HEARTBEAT_TIMEOUT\) must be > 0 seconds, got 0",
        ),
        (
            lambda: initialize_distributed("127.0.0.1:1234", 2, 2),
            r"process_id 2 must be in \[0, 2\)",
        ),
    ],
    ids=[
        "no port",
        "port out of range",
        "no host",
        "unknown host",
        "zero timeout",
        "zero heartbeat",
        "bad id",
    ],
)
def test_coordinator_settings_are_checked(call, pattern):
    with pytest.raises(ConfigError, match=pattern):
        call()
    assert split_address("[::1]:1234") == ("::1", 1234)
