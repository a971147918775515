"""The `data x pipe x tensor` device mesh and multi-process start-up."""

from __future__ import annotations

import os

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


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Starts `jax.distributed` from arguments or JAXPIPE_* / the usual cluster environment.

    Returns True when a multi-process runtime was started. On CPU, gloo collectives are used so
    that `ppermute` crosses processes.
    """
    coordinator = coordinator or os.environ.get("JAXPIPE_COORDINATOR")
    if num_processes is None and "JAXPIPE_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAXPIPE_NUM_PROCESSES"])
    if process_id is None and "JAXPIPE_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAXPIPE_PROCESS_ID"])
    if coordinator is None and num_processes in (None, 1):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return True
