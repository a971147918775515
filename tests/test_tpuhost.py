"""libtpu on a host with no TPU chip (`jaxpipe.tpuhost`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_libtpu

from jaxpipe import tpuhost

ROOT = Path(__file__).resolve().parents[1]


@needs_libtpu
def test_starting_jax_says_nothing_about_tpu_metadata_on_a_host_without_a_chip():
    if tpuhost.chip_attached():
        pytest.skip("a TPU host: libtpu finds its chips")
    env = {k: v for k, v in os.environ.items()
           if k not in tpuhost.COMPILE_ONLY_ENV and k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["PYTHONPATH"] = str(ROOT)
    code = "import jaxpipe, jax; print(jax.devices()[0].platform)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    assert done.stdout.strip() == "cpu"
    for noise in ("TPU_WORKER_HOSTNAMES", "host bounds", "INVALID_ARGUMENT"):
        assert noise not in done.stderr, done.stderr


def test_the_settings_keep_what_the_user_set(monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "worker-0")
    for var in ("ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_HOST_BOUNDS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tpuhost, "chip_attached", lambda: False)
    monkeypatch.setattr(tpuhost.importlib.util, "find_spec", lambda name: object())
    tpuhost.compile_only_env()
    assert os.environ["TPU_WORKER_HOSTNAMES"] == "worker-0"
    assert os.environ["TPU_HOST_BOUNDS"] == "1,1,1"
    monkeypatch.delenv("TPU_HOST_BOUNDS")
    monkeypatch.setattr(tpuhost, "chip_attached", lambda: True)  # a TPU host: nothing set
    tpuhost.compile_only_env()
    assert "TPU_HOST_BOUNDS" not in os.environ
