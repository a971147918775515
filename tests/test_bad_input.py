"""Every bad input in docs/errors.md gets a ConfigError with a plain sentence naming the fix."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxpipe.checkpoint import Checkpoints, load_params
from jaxpipe.config import ConfigError, ModelConfig, PipelineConfig, get_preset
from jaxpipe.costs import get_profile
from jaxpipe.data import TokenData, load_data
from jaxpipe.layout import StageLayout
from jaxpipe.mesh import make_mesh
from jaxpipe.partition import make_plan
from jaxpipe.schedule import build_table
from jaxpipe.train import TrainConfig, Trainer, train

ROOT = Path(__file__).resolve().parent.parent
TINY = get_preset("tiny", num_layers=2, max_seq_len=16)
TCFG = TrainConfig(steps=2, batch_size=4, seq_len=8)


def _trainer(model=TINY, S=1, Mb=1, tcfg=TCFG):
    pcfg = PipelineConfig(num_stages=S, num_microbatches=Mb)
    return Trainer.create(model, pcfg, tcfg, devices=jax.devices()[:S])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir holding checkpoints 1 and 2 of TINY."""
    workdir = tmp_path_factory.mktemp("ckpt")
    trainer = _trainer()
    state = trainer.init_state()
    with Checkpoints(workdir) as c:
        for step in (1, 2):
            c.save(trainer, state.replace(step=state.step + step), force=True)
    return workdir


def _corrupt_all(src, dst):
    import shutil

    shutil.copytree(src, dst)
    for f in (dst / "checkpoints").rglob("metadata"):
        if f.parent.name == "meta":
            f.write_text("{truncated")
    return dst


CASES = {
    "zero stages": (lambda: PipelineConfig(num_stages=0), "num_stages must be a positive"),
    "negative stages": (lambda: PipelineConfig(num_stages=-2), "num_stages must be a positive"),
    "zero micro-batches": (
        lambda: PipelineConfig(num_microbatches=0),
        "num_microbatches must be a positive",
    ),
    "mesh does not match devices": (
        lambda: make_mesh(PipelineConfig(num_stages=3, data_parallel=2), jax.devices()[:8]),
        r"= 6 devices, but 8 are available; make the product equal 8",
    ),
    "batch not divisible": (
        lambda: PipelineConfig(num_microbatches=4, data_parallel=2).check_batch(12),
        r"batch size 12 must be a positive multiple of .* = 8; try batch size 8",
    ),
    "more stages than layers": (
        lambda: _trainer(S=4),
        r"2 layers cannot fill num_stages x num_repeats = 4 x 1 = 4 virtual stages",
    ),
    "repeats with gpipe": (
        lambda: PipelineConfig(num_stages=2, num_repeats=2),
        "use schedule 'circular' for repeats",
    ),
    "repeats with zb_h1": (
        lambda: PipelineConfig(num_stages=2, num_repeats=2, schedule="zb_h1"),
        "use 'interleaved_1f1b' or 'zbv' for repeats",
    ),
    "zbv without two repeats": (
        lambda: PipelineConfig(num_stages=2, num_repeats=3, schedule="zbv"),
        "num_repeats must be 2, got 3",
    ),
    "unknown placement": (
        lambda: StageLayout(2, 2, (1, 1, 1, 1), "zigzag"),
        r"unknown placement 'zigzag'; choose one of \('loop', 'vee'\)",
    ),
    "unknown schedule": (
        lambda: PipelineConfig(schedule="zigzag"),
        r"unknown schedule 'zigzag'; choose one of",
    ),
    "interleaved M not a multiple of S": (
        lambda: build_table("interleaved_1f1b", 4, 2, 2),
        "num_microbatches 2 must be a multiple of num_stages 4; try 4",
    ),
    "unknown device profile": (
        lambda: get_profile("tpu-v9", TINY),
        r"unknown device 'tpu-v9'; choose one of",
    ),
    "unknown partition method": (
        lambda: make_plan(TINY, PipelineConfig(num_stages=2), "foo", batch_size=8, seq_len=16),
        r"unknown partition method 'foo'; choose one of",
    ),
    "unknown preset": (lambda: get_preset("gpt5"), r"unknown model preset 'gpt5'; choose one of"),
    "heads do not divide width": (
        lambda: ModelConfig(d_model=30, num_heads=4),
        "d_model 30 is not divisible by num_heads 4",
    ),
    "sequence longer than positions": (
        lambda: _trainer(tcfg=TrainConfig(batch_size=4, seq_len=32)),
        r"seq_len 32 exceeds the model's max_seq_len 16; use --seq_len <= 16",
    ),
    "missing data path": (
        lambda: load_data("/nonexistent/corpus.txt"),
        r"--data '/nonexistent/corpus.txt' does not exist",
    ),
    "data vocab larger than model": (
        lambda: train(
            _trainer(model=TINY.replace(vocab_size=100)),
            TokenData(np.arange(300, dtype=np.int32), 300, "ids"),
        ),
        "pass --vocab_size >= 300",
    ),
    "nan learning rate": (
        lambda: TrainConfig(learning_rate=float("nan")),
        "learning_rate must be finite and > 0, got nan; pass a value such as",
    ),
    "inf learning rate": (
        lambda: TrainConfig(learning_rate=float("inf")),
        "learning_rate must be finite and > 0, got inf",
    ),
    "negative learning rate": (
        lambda: TrainConfig(learning_rate=-1e-3),
        "learning_rate must be finite and > 0",
    ),
    "negative max_bad_steps": (
        lambda: TrainConfig(max_bad_steps=-1),
        "max_bad_steps must be >= 0",
    ),
    "zero checkpoint interval": (
        lambda: Checkpoints("/tmp/unused", every=0),
        "checkpoint_every and keep_checkpoints must be >= 1",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name):
    fn, pattern = CASES[name]
    with pytest.raises(ConfigError, match=pattern):
        fn()


def test_empty_data_path(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ConfigError, match="holds no tokens; point it at non-empty text"):
        load_data(str(tmp_path / "empty.txt"))


def test_checkpoint_of_another_model(saved):
    wide = _trainer(model=TINY.replace(d_model=64))
    with Checkpoints(saved) as c, pytest.raises(ConfigError) as e:
        c.restore(wide)
    assert "d_model 32 vs 64" in str(e.value) and "use the same model flags" in str(e.value)


def test_all_checkpoints_corrupt(saved, tmp_path):
    broken = _corrupt_all(saved, tmp_path / "w")
    with pytest.raises(ConfigError, match="every checkpoint in .* is corrupt"):
        load_params(broken)
    with Checkpoints(broken) as c, pytest.raises(ConfigError, match="is corrupt .*steps \\[1, 2"):
        c.restore(_trainer())


def test_noresume_with_existing_checkpoints(saved):
    from jaxpipe.checkpoint import train_resumable

    data = TokenData(np.arange(256, dtype=np.int32), 256, "ids")
    with pytest.raises(ConfigError, match="already holds checkpoints \\[1, 2\\]"):
        train_resumable(_trainer(), data, saved, resume=False)


FLAG_CASES = [
    (["--num_stages=0"], "num_stages must be a positive integer, got 0"),
    (["--learning_rate=nan"], "learning_rate must be finite and > 0, got nan"),
    (["--model=gpt5"], "unknown model preset 'gpt5'"),
    (["--partition=foo"], "unknown partition method 'foo'"),
    (["--attention=splash"], "attention='splash' is the Pallas TPU kernel, but this run's "
     "backend is cpu; use attention='xla'"),
    (["--data=/nonexistent/x.txt"], "--data '/nonexistent/x.txt' does not exist"),
]


@pytest.mark.parametrize("flags,message", FLAG_CASES, ids=[f[0][0] for f in FLAG_CASES])
def test_train_lm_flag_errors(tmp_path, flags, message):
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "train_lm.py"),
        "--model=tiny",
        "--num_stages=1",
        "--num_microbatches=1",
        "--batch_size=2",
        "--seq_len=8",
        "--steps=1",
        f"--workdir={tmp_path}",
        *flags,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: {message}" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr) < 2000
