"""The `data x pipe x tensor` device mesh and multi-process start-up."""

from __future__ import annotations

import math
import os
import socket
import time

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpipe.config import ConfigError, PipelineConfig

AXES = ("data", "pipe", "tensor")


def make_mesh(pcfg: PipelineConfig, devices=None) -> Mesh:
    """A mesh of shape (data, pipe, tensor); raises naming the fix when sizes do not match."""
    devices = list(jax.devices() if devices is None else devices)
    shape = (pcfg.data_parallel, pcfg.num_stages, pcfg.tensor_parallel)
    if int(np.prod(shape)) != len(devices):
        raise ConfigError(
            f"data x pipe x tensor = {shape[0]} x {shape[1]} x {shape[2]} = {int(np.prod(shape))}"
            f" devices, but {len(devices)} are available; make the product equal {len(devices)}"
            f" (on CPU, force more with XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def sharding(mesh: Mesh, *spec) -> NamedSharding:
    return NamedSharding(mesh, P(*spec))


def force_cpu_devices(n: int) -> None:
    """Asks for n CPU devices; must run before JAX initialises its backends."""
    jax.config.update("jax_num_cpu_devices", n)


# Cluster environments whose variables say that several processes were started together; there
# `jax.distributed.initialize()` finds the coordinator, process count and id by itself.
_CLUSTER_ENV = {
    "SLURM": "SLURM_NTASKS",
    "Open MPI": "OMPI_COMM_WORLD_SIZE",
    "TPU pod": "TPU_WORKER_HOSTNAMES",
}
HEARTBEAT_TIMEOUT_S = 20  # a process silent this long is dead; the others then stop too
INIT_TIMEOUT_S = 60  # how long the processes wait for each other at start-up


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def detected_cluster() -> str | None:
    """The multi-process cluster environment this process runs in, if any."""
    for name, var in _CLUSTER_ENV.items():
        value = os.environ.get(var, "")
        count = len(value.split(",")) if name == "TPU pod" else (_env_int(var) or 0)
        if count > 1:
            return name
    return None


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6 address]:port`) -> (host, port); raises naming the expected form."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"coordinator address {address!r} is not host:port (e.g. 10.0.0.1:1234, port 1 to "
            f"65535); fix --coordinator or JAXPIPE_COORDINATOR"
        )
    return host, int(port)


def wait_for_coordinator(address: str, timeout_s: float, poll_s: float = 0.5) -> None:
    """Waits until a TCP connection to `address` opens, retrying for up to `timeout_s`.

    A process that is not the coordinator runs this before `jax.distributed.initialize`: JAX's
    runtime aborts the whole process (a native crash, nothing Python can catch) when it cannot
    reach the coordinator in time, so an unreachable address becomes a ConfigError here instead.
    """
    host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            wait = max(min(deadline - time.monotonic(), 5.0), 0.1)
            with socket.create_connection((host, port), timeout=wait):
                return
        except socket.gaierror as e:
            raise ConfigError(
                f"cannot resolve the coordinator host {host!r} of {address!r} ({e.strerror}); "
                f"fix --coordinator or JAXPIPE_COORDINATOR"
            ) from None
        except OSError as e:
            reason = e.strerror or type(e).__name__
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConfigError(
                f"cannot reach the coordinator {address} within {timeout_s:g} s ({reason}); "
                f"start process 0 there first, fix --coordinator / JAXPIPE_COORDINATOR, or wait "
                f"longer with JAXPIPE_INIT_TIMEOUT=<seconds>"
            )
        time.sleep(min(poll_s, remaining))


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_s: int | None = None,
    init_timeout_s: float | None = None,
) -> bool:
    """Starts `jax.distributed` when several processes take part; call before any JAX work.

    Arguments win; missing ones come from JAXPIPE_COORDINATOR / JAXPIPE_NUM_PROCESSES /
    JAXPIPE_PROCESS_ID. With none of them, on SLURM, Open MPI or a TPU pod slice (or with
    coordinator "auto"), JAX's own cluster detection finds all three. Returns True when a
    multi-process runtime is running. On CPU, gloo collectives let `ppermute` cross processes.
    A process whose peers stop sending heartbeats for `heartbeat_timeout_s` (default 20 s,
    or JAXPIPE_HEARTBEAT_TIMEOUT) is terminated by the runtime instead of hanging. A process
    other than 0 that cannot reach the coordinator within `init_timeout_s` (default 60 s, or
    JAXPIPE_INIT_TIMEOUT) raises a ConfigError naming the address and the timeout.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get("JAXPIPE_COORDINATOR") or None
    if num_processes is None:
        num_processes = _env_int("JAXPIPE_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAXPIPE_PROCESS_ID")
    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = _env_int("JAXPIPE_HEARTBEAT_TIMEOUT")
    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = HEARTBEAT_TIMEOUT_S
    if init_timeout_s is None:
        init_timeout_s = _env_int("JAXPIPE_INIT_TIMEOUT")
    if init_timeout_s is None:
        init_timeout_s = max(INIT_TIMEOUT_S, 3 * heartbeat_timeout_s)
    for name, value in (
        ("heartbeat timeout (JAXPIPE_HEARTBEAT_TIMEOUT)", heartbeat_timeout_s),
        ("initialization timeout (JAXPIPE_INIT_TIMEOUT)", init_timeout_s),
    ):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"the {name} must be > 0 seconds, got {value}")
    auto = coordinator == "auto" or (
        coordinator is None and num_processes is None and detected_cluster() is not None
    )
    if auto:
        coordinator = None
    elif num_processes == 1 or (coordinator is None and num_processes is None):
        return False  # a single process
    elif coordinator is None or num_processes is None or process_id is None:
        raise ConfigError(
            f"multi-process start needs a coordinator address, the process count and this "
            f"process's id; got coordinator={coordinator!r}, num_processes={num_processes}, "
            f"process_id={process_id}. Pass --coordinator host:port --num_processes N "
            f"--process_id I (or JAXPIPE_COORDINATOR / JAXPIPE_NUM_PROCESSES / "
            f"JAXPIPE_PROCESS_ID), or --coordinator auto on a SLURM / TPU pod cluster"
        )
    elif num_processes < 1:
        raise ConfigError(f"num_processes must be >= 1, got {num_processes}")
    elif not 0 <= process_id < num_processes:
        raise ConfigError(f"process_id {process_id} must be in [0, {num_processes})")
    if coordinator is not None:
        split_address(coordinator)
        if process_id != 0:
            wait_for_coordinator(coordinator, init_timeout_s)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes=num_processes,
            process_id=process_id,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
            initialization_timeout=int(math.ceil(init_timeout_s)),
            shutdown_timeout_seconds=max(10, heartbeat_timeout_s),
        )
    except ValueError as e:  # raised before connecting: JAX's cluster detection found nothing
        if not auto:
            raise
        raise ConfigError(
            f"--coordinator auto: JAX detected no cluster environment here ({e}); pass "
            f"--coordinator host:port --num_processes N --process_id I instead"
        ) from None
    return True
