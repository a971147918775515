"""SIGINT and SIGTERM during training: every process stops after the same step.

`Interrupts` catches both signals while it is entered (in the main thread; elsewhere it catches
nothing) and remembers the first one; later ones are ignored while the run saves and exits. A
signal the process ignores (`nohup`, SIGINT of a background job) stays ignored.
`Agreement` turns each process's local stop code (0: go on; a signal number; `SAVE_FAILED`)
into one code that every process reads after the same step. With one process that is the local
code at once. With several, each step dispatches a max-reduction of the codes over all devices
and reads the reduction of the previous step, so every process sees the same code at the same
step one step after it was raised there; the read waits only for work the loop's one-step-late
metrics already wait for, so the check adds no host synchronisation.
"""

from __future__ import annotations

import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

SAVE_FAILED = 1000  # above every signal number: a failed save wins over an interrupt
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's code for a process ended by `signum`: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def agree_max(code: int) -> int:
    """The max of `code` over processes, at once (a blocking collective with several)."""
    if jax.process_count() == 1:
        return code
    return int(np.max(multihost_utils.process_allgather(np.asarray(code, np.int32))))


class Interrupts:
    """Context manager: the first SIGINT or SIGTERM received while entered, in `signum`."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:  # nohup, a background job
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class Agreement:
    """`agree(code)` -> the code every process acts on after this step (see the module doc)."""

    def __init__(self):
        self.multi = jax.process_count() > 1
        self._pending = None
        if self.multi:
            devices = np.array(jax.devices())
            mesh = Mesh(devices, ("all",))
            self._shape = (devices.size,)
            self._sharding = NamedSharding(mesh, P("all"))
            self._reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

    def __call__(self, code: int) -> int:
        if not self.multi:
            return code
        local = np.full((1,), code, np.int32)
        codes = jax.make_array_from_callback(self._shape, self._sharding, lambda _: local)
        previous, self._pending = self._pending, self._reduce(codes)
        return 0 if previous is None else int(np.asarray(previous.addressable_data(0)))
