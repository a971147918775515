"""Starts a multi-process run on this machine: N processes, each with its own CPU devices.

Every process gets JAXPIPE_COORDINATOR (127.0.0.1 and a free port), JAXPIPE_NUM_PROCESSES and
JAXPIPE_PROCESS_ID, and `--devices=D`; together they form one mesh of N x D devices and talk
through gloo collectives. Process 0's output is streamed here; the others' goes to
LOG_DIR/process_<i>.log. If any process exits non-zero, the rest are killed and this script
exits with that code (the bounded-time guarantee does not depend on JAX noticing the loss).
Ctrl-C sends SIGTERM to every process, gives them 30 s to save and exit, kills the rest, and
exits with status 130. Bad launcher flags print `error: ...` and exit with status 2.

Run (pipe = 4 spanning 2 processes of 2 devices each; about 1 minute on 2 cores):

    python experiments/launch_local.py --num_processes 2 --devices_per_process 2 -- \
        --model tiny --num_layers 4 --num_stages 4 --num_microbatches 4 --batch_size 8 \
        --seq_len 32 --steps 20 --log_every 5 --workdir runs/mp

Expect the same losses as the single-process run of the same train_lm.py flags (to fp32
round-off; on this machine they are bit-identical).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxpipe import cli
from jaxpipe.config import ConfigError

TRAIN_LM = Path(__file__).resolve().parent / "train_lm.py"
MAX_PROCESSES = 64  # one Python + JAX runtime each, on this one machine
MAX_DEVICES_PER_PROCESS = 256  # forced CPU devices; XLA's start-up grows with their number
INTERRUPT_GRACE_S = 30.0  # on Ctrl-C, time the processes get to save and exit after SIGTERM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    script_args: list[str],
    num_processes: int,
    devices_per_process: int,
    script: str | Path = TRAIN_LM,
    log_dir: str | Path | None = None,
    timeout_s: float | None = None,
    grace_s: float = 5.0,
) -> int:
    """Runs `python script script_args --devices=D` in N processes; returns the exit code.

    The first non-zero exit (or the timeout, code 124) kills the remaining processes. Raises
    ConfigError, before starting anything, on counts, paths or a timeout that cannot work.
    """
    check_launch(num_processes, devices_per_process, script, log_dir, timeout_s)
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="jaxpipe_launch_"))
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --log_dir {str(log_dir)!r}: {e.strerror or e}") from None
    coordinator = f"127.0.0.1:{free_port()}"
    procs, logs = [], []
    for i in range(num_processes):
        env = {
            **os.environ,
            "JAXPIPE_COORDINATOR": coordinator,
            "JAXPIPE_NUM_PROCESSES": str(num_processes),
            "JAXPIPE_PROCESS_ID": str(i),
            "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        }
        cmd = [sys.executable, "-u", str(script), *script_args, f"--devices={devices_per_process}"]
        out = None if i == 0 else open(log_dir / f"process_{i}.log", "w")
        logs.append(out)
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        )
    print(
        f"launched {num_processes} processes (coordinator {coordinator}); logs of processes "
        f"1.. in {log_dir}",
        file=sys.stderr,
        flush=True,
    )
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    code = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                print(
                    f"process {i} exited with code {code}; stopping the others",
                    file=sys.stderr,
                    flush=True,
                )
                break
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(
                    f"timed out after {timeout_s:.0f}s; stopping all processes",
                    file=sys.stderr,
                    flush=True,
                )
                code = 124
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        print(
            f"interrupted; stopping all processes (SIGTERM, then SIGKILL after "
            f"{INTERRUPT_GRACE_S:.0f}s; Ctrl-C again to kill them now)",
            file=sys.stderr,
            flush=True,
        )
        grace_s, code = max(grace_s, INTERRUPT_GRACE_S), 130
    finally:
        _stop(procs, grace_s)
        for f in logs:
            if f:
                f.close()
    return code if code > 0 else 1  # killed by a signal: negative returncode


def check_launch(
    num_processes: int,
    devices_per_process: int,
    script: str | Path,
    log_dir: str | Path | None,
    timeout_s: float | None,
) -> None:
    """Raises ConfigError naming the fix for a launch that would run nothing or the wrong thing."""
    if not 1 <= num_processes <= MAX_PROCESSES:
        raise ConfigError(
            f"--num_processes must be 1 to {MAX_PROCESSES}, got {num_processes}"
        )
    if not 1 <= devices_per_process <= MAX_DEVICES_PER_PROCESS:
        raise ConfigError(
            f"--devices_per_process must be 1 to {MAX_DEVICES_PER_PROCESS}, got "
            f"{devices_per_process}"
        )
    if not Path(script).is_file():
        raise ConfigError(f"--script {str(script)!r} is not a file; give a Python script")
    if log_dir is not None and Path(log_dir).exists() and not Path(log_dir).is_dir():
        raise ConfigError(f"--log_dir {str(log_dir)!r} is a file; give a directory")
    if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigError(f"--timeout_s must be a finite number of seconds > 0, got {timeout_s}")


def _stop(procs, grace_s: float) -> None:
    """SIGTERM to the processes still running; SIGKILL to those alive after `grace_s` (or at
    once on Ctrl-C)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace_s
    try:
        for p in procs:
            try:
                p.wait(timeout=max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
    except KeyboardInterrupt:
        pass
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="launch_local.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=2)
    parser.add_argument("--script", default=str(TRAIN_LM), help="Python script to run.")
    parser.add_argument("--log_dir", default=None, help="Where processes 1.. write their logs.")
    parser.add_argument("--timeout_s", type=float, default=None, help="Kill all after this.")
    args, rest = parser.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    return cli.guard(
        lambda: launch(
            rest,
            args.num_processes,
            args.devices_per_process,
            args.script,
            args.log_dir,
            args.timeout_s,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
