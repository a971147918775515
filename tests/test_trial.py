"""The autotuner's first candidates timed on the devices present (`jaxpipe.trial`)."""

import pytest

from jaxpipe import plan as plan_cli
from jaxpipe.autotune import AutotuneResult, Cluster, search
from jaxpipe.config import ConfigError, get_preset
from jaxpipe.trial import trial
from tests.conftest import needs_devices

MODEL = get_preset("tiny", num_layers=4, max_seq_len=32)


def _unsearched(cluster: Cluster) -> AutotuneResult:
    return AutotuneResult(MODEL, cluster, 8, 32, (), 0, 0, 0.0)


@needs_devices(2)
def test_the_timed_candidates_are_ranked_by_their_measured_steps():
    found = search(MODEL, Cluster(2, "cpu"), global_batch=8, seq_len=32, top=4,
                   fit_steps=False)
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
