"""The benchmarks' output: one JSON object on stdout, and in a file when asked."""

from __future__ import annotations

import json


def emit(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def main_on_cpu_devices(measure, args, devices: int) -> int:
    """Forces `devices` CPU devices when JAX runs on the CPU, then prints `measure(args)` as
    JSON under the CLI's error guard. JAX is imported here, not at the top, so that a script's
    JAX_PLATFORMS default is set before JAX reads it."""
    import jax

    from jaxpipe import cli
    from jaxpipe.mesh import force_cpu_devices

    if jax.config.jax_platforms == "cpu":
        force_cpu_devices(devices)
    return cli.guard(lambda: print(json.dumps(measure(args), indent=1)))
