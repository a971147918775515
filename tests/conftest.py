"""Forces 8 CPU devices once, before JAX initialises, for every test."""

import importlib.util
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def needs_devices(n: int):
    return pytest.mark.skipif(len(jax.devices()) < n, reason=f"needs {n} devices")


# Tests that compile for TPU chips on this host (the tpu extra installs libtpu).
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed; pip install 'jaxpipe[tpu]' (the tpu extra) runs this test",
)


def hide_libtpu(monkeypatch) -> None:
    """Makes libtpu look uninstalled for the rest of the test."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else find_spec(name, *a))


@pytest.fixture
def sample_main(capsys):
    """experiments/sample.py's main with flags, in this process: (exit status, stdout, stderr).
    Flags start from their defaults on each call; arguments not spelled --flag are passed as
    positional ones."""
    from absl import flags

    from experiments import sample

    def run(*args):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["sample.py", *[a for a in args if a.startswith("--")]])
        try:
            sample.main(["sample.py", *[a for a in args if not a.startswith("--")]])
            code = 0
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    yield run
    flags.FLAGS.unparse_flags()
