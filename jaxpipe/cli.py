"""The command-line contract every entry point shares: bad input is one line, never a traceback.

A flag that does not parse (`--num_stages abc`, an unknown flag, a stray argument) and a value
that cannot work (a `ConfigError`) both print `error: <what to change>` on stderr and exit with
status 2. `--help` prints the usage and exits 0. The absl scripts in `experiments/` start with
`run_app(main)` instead of `app.run(main)`; `python -m jaxpipe.plan`, `python -m
jaxpipe.schedule`, `launch_local.py` and the `bench_*.py` scripts parse with `ArgumentParser`
and run their body under `guard`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from absl import app, flags

from jaxpipe.config import ConfigError

USAGE_ERROR = 2  # exit status of every bad-input error


def fail(message: str) -> NoReturn:
    """Prints `error: <message>` on stderr and exits with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the shared contract: a parse error is one `error:` line and status 2
    (plain argparse prints the whole usage block and `prog: error: ...` first). Flags are
    spelled in full, as absl wants them: `--stage` is not taken for `--stages`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{message}; see {self.prog} --help")


PIPE_CLOSED = 141  # the shell's status of a process ended by SIGPIPE


def guard(body: Callable[[], int | None]) -> int:
    """Runs a CLI body; a `ConfigError` becomes `error: ...` and status 2, else its status.

    Output piped into a reader that stops early (`| head`) ends the tool quietly with status
    141, as SIGPIPE ends other command-line tools, instead of a BrokenPipeError traceback.
    """
    try:
        return body() or 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return USAGE_ERROR
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return PIPE_CLOSED


def parse_absl_flags(argv: list[str]) -> list[str]:
    """absl's flag parser under the shared contract (absl itself prints `FATAL Flags parsing
    error` and exits 1). Positional arguments are refused: every input is a --flag."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{_one_line(e)}; see {Path(argv[0]).name} --help")
    except SystemExit as e:  # --help / --helpfull print the usage and exit 1 in absl
        sys.exit(0 if e.code == 1 else e.code)
    if len(rest) > 1:
        fail(f"unexpected arguments {rest[1:]}; flags are spelled --name=value")
    return rest


def run_app(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """`absl.app.run(main)` with `parse_absl_flags`; a `ConfigError` that `main` lets through
    becomes `error: ...` and status 2 as well."""

    def guarded(args: list[str]):
        return guard(lambda: main(args))

    app.run(guarded, argv=argv, flags_parser=parse_absl_flags)


def writable_file(path: str, flag: str) -> str:
    """Checks that `path` names a file this process can create or overwrite; raises naming the
    flag. Run before any expensive work so that a bad output path fails at once."""
    if path == "":
        raise ConfigError(f"{flag} is empty; give a file path")
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path!r} is a directory; give a file path inside it")
    parent = p.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path!r}: directory {str(parent)!r} does not exist; create it")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ConfigError(f"{flag} {path!r} is not writable; choose another path")
    return path


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()).rstrip(".")
