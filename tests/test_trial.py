"""The autotuner's first candidates timed on the devices present (`jaxpipe.trial`)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxpipe import plan as plan_cli
from jaxpipe.autotune import AutotuneResult, Cluster, search
from jaxpipe.config import ConfigError, get_preset
from jaxpipe.trial import trial
from tests.conftest import needs_devices

MODEL = get_preset("tiny", num_layers=4, max_seq_len=32)
ROOT = Path(__file__).resolve().parents[1]


def _unsearched(cluster: Cluster) -> AutotuneResult:
    return AutotuneResult(MODEL, cluster, 8, 32, (), 0, 0, 0.0)


@needs_devices(2)
def test_the_timed_candidates_are_ranked_by_their_measured_steps():
    # a narrow search (its profile is measured for micro-batches 1 and 2 only) keeps this short
    found = search(MODEL, Cluster(2, "cpu"), global_batch=8, seq_len=32, top=4,
                   fit_steps=False, max_microbatch=2, schedules=("gpipe", "1f1b"),
                   splits=("none",))
    timed = trial(found, count=3, reps=2)
    assert len(timed.measured_s) == 3 and min(timed.measured_s) > 0
    order = timed.ranked
    assert sorted(order) == [0, 1, 2]
    assert [timed.measured_s[i] for i in order] == sorted(timed.measured_s)
    assert timed.best is found.candidates[order[0]]
    table = timed.table()
    assert table.splitlines()[-1] == "best (timed): " + timed.best.flags("cpu")
    # after the search's table: the timed candidates, fastest first, by their search rank
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("timed on 2 cpu"))
    rows = [line.split() for line in lines[start + 2:-1]]
    assert [int(r[0]) for r in rows] == [i + 1 for i in order]
    assert [float(r[-2]) for r in rows] == sorted(float(r[-2]) for r in rows)
    data = timed.to_dict()
    assert [t["candidate"] for t in data["timed"]] == [i + 1 for i in order]


def test_timing_needs_the_clusters_devices_here():
    with pytest.raises(ConfigError, match=r"planned h100 devices \(gpu\).*--device"):
        trial(_unsearched(Cluster(2, "h100")))
    with pytest.raises(ConfigError, match=r"planned 4096 devices.*--devices"):
        trial(_unsearched(Cluster(4096, "cpu")))
    with pytest.raises(ConfigError, match=">= 1"):
        trial(_unsearched(Cluster(1, "cpu")), count=0)


def test_the_cli_times_only_with_auto_and_without_a_topology(capsys):
    assert plan_cli.main(["--model", "tiny", "--time", "2"]) == 2
    assert "--time runs the autotuner's candidates; add --auto" in capsys.readouterr().err
    argv = ["--auto", "--model", "tiny", "--global_batch", "8", "--time", "2",
            "--topology", "cpu:2"]
    assert plan_cli.main(argv) == 2
    assert "use one of them" in capsys.readouterr().err


def _train_lm(tmp_path, *flags):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(ROOT / "experiments" / "train_lm.py"), "--devices", "2",
           "--model", "tiny", "--num_layers", "2", "--batch_size", "4", "--seq_len", "16",
           "--steps", "1", f"--workdir={tmp_path / 'run'}", *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_lm_auto_time_trains_the_fastest_measured(tmp_path):
    proc = _train_lm(tmp_path, "--auto", "--auto_time", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "timed on 2 cpu devices" in proc.stdout
    flags = next(line for line in proc.stdout.splitlines() if line.startswith("best (timed): "))
    value = dict(re.findall(r"--(\w+) (\S+)", flags))
    pipeline = json.loads((tmp_path / "run" / "config.json").read_text())["pipeline"]
    for name in ("data_parallel", "num_stages", "num_microbatches", "schedule", "remat"):
        assert str(pipeline[name]) == value[name], name


def test_train_lm_auto_time_needs_auto(tmp_path):
    proc = _train_lm(tmp_path, "--auto_time", "2")
    assert proc.returncode != 0 and "--auto_time times the autotuner's" in proc.stderr
