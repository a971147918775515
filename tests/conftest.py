"""Forces 8 CPU devices once, before JAX initialises, for every test."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def needs_devices(n: int):
    return pytest.mark.skipif(len(jax.devices()) < n, reason=f"needs {n} devices")
