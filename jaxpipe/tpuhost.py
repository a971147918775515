"""What libtpu needs on a host with no TPU chip attached.

With the `tpu` extra installed, libtpu serves compile-only TPU devices (`topology.get_topology`)
on any host. It is also loaded whenever JAX starts its backends; on a host with no chip it then
prints several lines of errors about TPU metadata it cannot read before JAX goes on without it.
Naming the host a one-host slice stops that, and allowing more than one process to load libtpu
lets two compiling processes run side by side (otherwise the second fails on libtpu's
multi-process lockfile, a guard for chips that are not there). `compile_only_env` sets both,
only where unset, and only where libtpu is installed and no chip is attached; it must run
before JAX starts its backends (the package runs it on import).
"""

from __future__ import annotations

import glob
import importlib.util
import os

COMPILE_ONLY_ENV = {
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_HOST_BOUNDS": "1,1,1",
    "TPU_WORKER_HOSTNAMES": "localhost",
}


def chip_attached() -> bool:
    """Whether this host has a TPU chip (its accelerator or VFIO device files)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def compile_only_env() -> None:
    """The settings above, where libtpu is installed, no chip is attached and they are unset."""
    if importlib.util.find_spec("libtpu") is None or chip_attached():
        return
    for var, value in COMPILE_ONLY_ENV.items():
        os.environ.setdefault(var, value)
