"""A run's work directory: checked before any expensive work, and locked while a run uses it.

`check_workdir` refuses, with a `ConfigError` naming the fix, every path a run cannot or must
not write: an empty or blank name, an unexpanded `~`, a file (or a symlink to one), a dangling
symlink, a path under a file, the kernel's /proc and /sys, a directory this user cannot write,
one inside another run's checkpoints/, and an existing directory that holds other files than a
jaxpipe run's (a run's directory is one with the lock file, a checkpoints/ directory, or both
config.json and plan.json). An empty or new directory is fine; it is created.

`lock_workdir` takes an exclusive `fcntl.flock` on WORKDIR/.jaxpipe.lock and records the
holder's pid, host and start time in it; a second run on the same directory gets a
`WorkdirBusy` error naming them. The kernel drops the lock when its process ends, however it
ends (SIGKILL included), so a lock file left behind never blocks the next run. `hold_workdir`
is the multi-process form: process 0 locks and every process learns the outcome through a
collective, so either all of them train or all of them stop with the same error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import jax

from jaxpipe.agree import process0_text
from jaxpipe.checkpoint import CKPT_DIR, describe_model
from jaxpipe.config import ConfigError, ModelConfig

LOCK_NAME = ".jaxpipe.lock"
# Files a run writes directly in its workdir (checkpoints/ aside): each must be a writable file.
RUN_FILES = ("config.json", "plan.json", "metrics.jsonl", "summary.json", "loss.png",
             "tokenizer.json")
_PSEUDO_FS = ("proc", "sys")  # kernel file systems: no ordinary files can be created there


class WorkdirBusy(ConfigError):
    """Another live process holds the workdir's lock."""


def _fail(what: str, fix: str = "pass another --workdir") -> ConfigError:
    return ConfigError(f"{what}; {fix}")


def _check_name(path: str | Path) -> Path:
    text = os.fspath(path)
    if not text.strip():
        raise _fail(f"--workdir is empty or blank ({text!r})",
                    "give a directory, e.g. --workdir runs/x")
    if "\0" in text:
        raise _fail(f"--workdir {text!r} contains a NUL byte")
    if text.startswith("~"):
        raise _fail(
            f"--workdir {text!r} starts with '~', which the shell did not expand",
            f"write the path out, e.g. --workdir {os.path.expanduser(text)}",
        )
    return Path(os.path.abspath(text))


def is_run_dir(path: Path) -> bool:
    """Whether an existing directory is a jaxpipe run's (so a run may resume in it)."""
    return (
        (path / LOCK_NAME).is_file()
        or (path / CKPT_DIR).is_dir()
        or ((path / "config.json").is_file() and (path / "plan.json").is_file())
    )


def _check_kind(p: Path) -> None:
    """Refuses paths that are not, and cannot become, a directory."""
    if p.is_symlink() and not p.exists():
        raise _fail(
            f"--workdir {p} is a symlink to {os.readlink(p)}, which does not exist",
            "create that directory first, or pass another --workdir",
        )
    if p.exists() and not p.is_dir():
        kind = "a symlink to a file" if p.is_symlink() else "a file, not a directory"
        raise _fail(f"--workdir {p} is {kind}")
    real = p.resolve()
    if len(real.parts) > 1 and real.parts[1] in _PSEUDO_FS:
        raise _fail(f"--workdir {p} is under /{real.parts[1]}, a kernel file system that "
                    f"cannot hold a run's files", "pass a directory on disk")
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise _fail(f"--workdir {p} lies under {parent}, which is a file")
        if parent.name == CKPT_DIR and parent.parent.is_dir() and is_run_dir(parent.parent):
            raise _fail(
                f"--workdir {p} lies inside {parent}, the checkpoint directory of the run in "
                f"{parent.parent}", "pass a directory outside it"
            )


def _check_contents(p: Path) -> None:
    try:
        entries = sorted(e.name for e in p.iterdir())
    except OSError as e:
        raise _fail(f"cannot list --workdir {p}: {e.strerror}") from None
    for name in (LOCK_NAME, *RUN_FILES):
        f = p / name
        if f.is_symlink() and not f.exists():
            raise _fail(f"{f} is a dangling symlink", "remove it or pass another --workdir")
        if f.exists() and not f.is_file():
            raise _fail(f"{f} is not a regular file", "remove it or pass another --workdir")
        if f.exists() and not os.access(f, os.R_OK | os.W_OK):
            raise _fail(f"{f} is not writable by this user",
                        "fix its permissions or pass another --workdir")
    ckpt = p / CKPT_DIR
    if ckpt.exists() and not ckpt.is_dir():
        raise _fail(f"{ckpt} is not a directory", "remove it or pass another --workdir")
    if entries and not is_run_dir(p):
        shown = ", ".join(repr(n) for n in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise _fail(
            f"--workdir {p} already holds files that are not from a jaxpipe run ({shown}) and "
            f"a run would overwrite them",
            "pass a new or empty directory, or a previous run's workdir to resume it",
        )


def check_workdir(path: str | Path) -> Path:
    """Validates a run's workdir and creates it; returns its absolute path.

    Cheap (no JAX work): call it before device set-up and planning. Raises ConfigError.
    """
    p = _check_name(path)
    try:
        _check_kind(p)
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a name too long, a parent that cannot be listed, a full disk
        raise _fail(f"cannot create --workdir {p}: {e.strerror}") from None
    if not os.access(p, os.R_OK | os.W_OK | os.X_OK):
        raise _fail(f"--workdir {p} is not writable by this user",
                    "fix its permissions or pass another --workdir")
    _check_contents(p)
    return p


def check_run_dir(path: str | Path) -> Path:
    """Validates a workdir that is only read (sampling): it must exist and be a directory."""
    p = _check_name(path)
    if not p.exists():
        raise _fail(f"--workdir {p} does not exist", "pass the --workdir of a training run")
    if not p.is_dir():
        raise _fail(f"--workdir {p} is a file, not a directory",
                    "pass the --workdir of a training run")
    return p


def check_same_model(path: str | Path, model: ModelConfig) -> None:
    """Refuses a workdir whose config.json records another model (metrics would mix)."""
    f = Path(path) / "config.json"
    if not f.is_file():
        return
    try:
        saved = ModelConfig(**json.loads(f.read_text())["model"])
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(f"warning: {f} is unreadable ({type(e).__name__}); this run rewrites it",
              flush=True)
        return
    a, b = dataclasses.asdict(saved), dataclasses.asdict(model)
    diff = [f"{k} {a[k]} vs {b[k]}" for k in a if k != "name" and a[k] != b.get(k)]
    if diff:
        raise _fail(
            f"--workdir {path} holds a run of model {describe_model(saved)} but this run builds "
            f"{describe_model(model)} (differs in {', '.join(diff)})",
            "use the same model flags as that run, or another --workdir",
        )


def write_text(path: Path, text: str) -> None:
    """Writes a run file; an OSError (disk full, permissions) becomes a ConfigError."""
    try:
        path.write_text(text)
    except OSError as e:
        raise _fail(f"cannot write {path}: {e.strerror}",
                    "free space or fix permissions, or pass another --workdir") from None


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a workdir's lock, as recorded in the lock file."""

    pid: int | None
    host: str | None
    started: str | None

    @staticmethod
    def parse(text: str) -> Holder:
        try:
            d = json.loads(text)
            return Holder(int(d["pid"]), str(d["host"]), str(d.get("started")))
        except (ValueError, TypeError, KeyError):
            return Holder(None, None, None)

    def describe(self) -> str:
        if self.pid is None:
            return "another process (its pid and host are not recorded yet)"
        return f"pid {self.pid} on host {self.host} (started {self.started})"


class WorkdirLock:
    """An exclusive lock on WORKDIR/.jaxpipe.lock, held until `release()` or process exit."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / LOCK_NAME
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            why = "it is a symlink" if e.errno == errno.ELOOP else e.strerror
            raise _fail(f"cannot open the lock file {self.path}: {why}",
                        "remove it, or pass another --workdir") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.parse(self._read())
            os.close(self._fd)
            raise WorkdirBusy(
                f"--workdir {workdir} is in use by another run: {holder.describe()} holds "
                f"{self.path}; wait for it to finish, stop it, or pass another --workdir"
            ) from None
        except OSError as e:
            os.close(self._fd)
            raise _fail(f"cannot lock {self.path}: {e.strerror}",
                        "pass a --workdir on a file system with file locks") from None
        previous = Holder.parse(self._read())
        if previous.pid is not None:
            print(f"note: the previous run in {workdir} ({previous.describe()}) ended without "
                  f"releasing it; continuing", flush=True)
        self.holder = Holder(os.getpid(), socket.gethostname(),
                             time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self._write(json.dumps(dataclasses.asdict(self.holder)) + "\n")

    def _read(self) -> str:
        try:
            return os.pread(self._fd, 4096, 0).decode("utf-8", "replace")
        except OSError:
            return ""

    def _write(self, text: str) -> None:
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text.encode(), 0)
        except OSError as e:
            self.release()
            raise _fail(f"cannot write the lock file {self.path}: {e.strerror}",
                        "free space or fix permissions, or pass another --workdir") from None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Marks the run as ended (an empty lock file) and drops the lock."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass  # the lock itself still goes with the descriptor
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_workdir(workdir: str | Path) -> WorkdirLock:
    """Locks an existing workdir for this process; WorkdirBusy when another run holds it."""
    return WorkdirLock(workdir)


@contextlib.contextmanager
def hold_workdir(workdir: str | Path) -> Iterator[WorkdirLock | None]:
    """Holds the workdir for a run of any number of processes, until the block ends: process 0
    holds the lock (yielded; None elsewhere), and every process raises the same ConfigError on
    entry if it could not. A collective when there are several processes: enter it in each."""
    if jax.process_count() == 1:
        lock = lock_workdir(workdir)
    else:
        lock, error = None, ""
        if jax.process_index() == 0:
            try:
                lock = lock_workdir(workdir)
            except ConfigError as e:
                error = str(e)
        error = process0_text(error)
        if error:
            raise ConfigError(error if jax.process_index() == 0 else f"process 0: {error}")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
