"""finetune.py starts from a Hugging Face checkpoint, not from the seed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxpipe import model as M
from jaxpipe.config import get_preset
from jaxpipe.data import load_data
from jaxpipe.hf import save_hf

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # the default run checks the same at one stage (test_tokenizer.py)
def test_finetune_starts_from_the_checkpoint(tmp_path):
    cfg = get_preset("tiny-llama", num_layers=4, max_seq_len=32, num_heads=4, num_kv_heads=2)
    params = jax.device_get(M.init_params(cfg, seed=123))
    save_hf(cfg, params, tmp_path / "hf")
    workdir = tmp_path / "run"
    cmd = [
        sys.executable, str(ROOT / "experiments" / "finetune.py"),
        f"--hf_checkpoint={tmp_path / 'hf'}", "--num_stages=2", "--num_microbatches=2",
        "--batch_size=4", "--seq_len=16", "--steps=3", "--log_every=1", "--seed=5",
        "--learning_rate=1e-3", f"--workdir={workdir}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    tokens = load_data(None).batch(0, 4, 16, seed=5)
    expected = float(M.reference_loss(cfg, params, tokens))
    np.testing.assert_allclose(first["loss"], expected, rtol=1e-5)
    seeded = float(M.reference_loss(cfg, M.init_params(cfg, seed=5), tokens))
    assert abs(first["loss"] - seeded) > 1e-3  # not the seed's initialisation
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["style"] == "llama" and saved["model"]["num_kv_heads"] == 2
