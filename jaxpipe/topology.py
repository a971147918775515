"""Device topologies to compile for: `<generation>:<chips>` TPU slices through libtpu's
compile-only devices (no TPU needed; `pip install 'jaxpipe[tpu]'`), or `cpu:N` forced CPU
devices."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax
from jax.experimental import topologies

from jaxpipe.config import ConfigError
from jaxpipe.costs import PROFILES, host_memory
from jaxpipe.mesh import force_cpu_devices
from jaxpipe.tpuhost import compile_only_env

TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")
# HBM per chip from the device profiles' spec-sheet figures (v4 32 GiB, v5e 16, v5p 95, v6e 32).
# Compile-only devices report no memory (`memory_stats` needs an attached chip), so this table
# is the capacity unless the compiler names its own in an out-of-memory error.
CHIP_HBM_BYTES = {gen: PROFILES[f"tpu-{gen}"].hbm_bytes for gen in TPU_GENERATIONS}
TPU_EXTRA = "pip install 'jaxpipe[tpu]'"
_TOPOLOGY = re.compile(r"^(?:cpu:(\d+)|(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2}))$")


def parse_topology(name: str) -> tuple[str, str | int]:
    """`cpu:N` -> ("cpu", N); `v5p:4x4x4` -> ("v5p", "4x4x4"); else a ConfigError."""
    m = _TOPOLOGY.match(name) if isinstance(name, str) else None
    if m is None or (m.group(1) is not None and int(m.group(1)) < 1):
        raise ConfigError(
            f"unknown topology {name!r}; use <generation>:<chips> with generation one of "
            f"{TPU_GENERATIONS} (e.g. v5p:4x4x4, v5e:4x4), or cpu:N for N CPU devices"
        )
    if m.group(1) is not None:
        return "cpu", int(m.group(1))
    return m.group(2), m.group(3)


def profile_name(topology: str) -> str:
    """The planner's device profile for a topology: `tpu-v5p` for `v5p:...`, `cpu` for `cpu:N`."""
    kind, _ = parse_topology(topology)
    return "cpu" if kind == "cpu" else f"tpu-{kind}"


def chip_topology(profile: str) -> str | None:
    """The one-chip topology of a `tpu-<generation>` device profile (`v5p:1x1x1`, `v5e:1x1`);
    None for other profiles."""
    gen = profile.removeprefix("tpu-")
    if not profile.startswith("tpu-") or gen not in TPU_GENERATIONS:
        return None
    return f"{gen}:1x1" if gen in ("v5e", "v6e") else f"{gen}:1x1x1"


def costing_target(profile: str):
    """(device, platform) to compile layers on when planning for the device profile `profile`:
    for a TPU generation, one compile-only chip of it when libtpu is installed (the target
    compiler's own temporaries and kernels, the splash attention kernel included); else
    (None, this process's backend): the layers compile for the devices JAX has here, which is
    the target itself on a TPU host."""
    name = chip_topology(profile)
    if name is None or jax.default_backend() == "tpu" or importlib.util.find_spec("libtpu") is None:
        return None, jax.default_backend()
    return get_topology(name).devices[0], "tpu"


def prepare_host(topology: str) -> None:
    """Call before JAX starts: N CPU devices for `cpu:N`, and the host CPU as JAX's platform
    (unless JAX_PLATFORMS names one), so that no attached accelerator is opened."""
    kind, n = parse_topology(topology)
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    if kind == "cpu":
        try:
            force_cpu_devices(n)
        except RuntimeError:  # JAX already started; `get_topology` checks the device count
            pass


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    platform: str  # "tpu" or "cpu"
    devices: tuple
    hbm_bytes: float  # per device: the chip's HBM over its devices, or host RAM / N on CPU
    hbm_source: str


def present(devices=None, name: str | None = None) -> Topology:
    """The devices this program runs on (default: all of JAX's), as a topology to compile for
    (named `name`, default "<count> x <device kind>"): their memory from the runtime's
    `memory_stats` where it reports a limit (GPU, TPU), else host RAM over the CPU devices."""
    devices = tuple(jax.devices() if devices is None else devices)
    platform = devices[0].platform
    stats = (devices[0].memory_stats() or {}) if platform != "cpu" else {}
    if "bytes_limit" in stats:
        hbm, source = float(stats["bytes_limit"]), "runtime"
    else:
        hbm, source = host_memory() / len(devices), f"host RAM / {len(devices)}"
    name = name or f"{len(devices)} x {devices[0].device_kind}"
    return Topology(name, platform, devices, hbm, source)


def resolve(topology: str | Topology) -> Topology:
    """A topology string's devices (`get_topology`), or a `Topology` itself."""
    return topology if isinstance(topology, Topology) else get_topology(topology)


def get_topology(name: str) -> Topology:
    """The devices of a topology string (see the module docstring); raises naming the fix."""
    kind, size = parse_topology(name)
    if kind == "cpu":
        have = jax.devices("cpu")
        if len(have) < size:
            raise ConfigError(
                f"topology {name} needs {size} CPU devices but this process has {len(have)}; "
                f"force them before JAX starts with jaxpipe.mesh.force_cpu_devices({size}) "
                f"(python -m jaxpipe.plan --aot does so itself)"
            )
        return present(have[:size], name)
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(
            f"compiling for TPU topology {name} needs libtpu, which is not installed; "
            f"install it with {TPU_EXTRA}"
        )
    compile_only_env()  # in case JAX's backends have not started yet
    try:
        devices = topologies.get_topology_desc(name, "tpu").devices
    except jax.errors.JaxRuntimeError as e:
        raise ConfigError(f"libtpu rejects topology {name!r}: {first_line(e)}") from None
    per_chip: dict[tuple, int] = {}
    for d in devices:
        key = tuple(getattr(d, "coords", (d.id,)))
        per_chip[key] = per_chip.get(key, 0) + 1
    share = max(per_chip.values())
    hbm = CHIP_HBM_BYTES[kind] / share
    source = "spec sheet" + (f", chip / {share} devices" if share > 1 else "")
    return Topology(name, "tpu", tuple(devices), hbm, source)


def first_line(error) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__
