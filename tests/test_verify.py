"""The autotuner's candidates compiled for a topology: the first that fits is named best."""

import json

import jax
import pytest
from conftest import needs_libtpu

from jaxpipe import autotune, plan
from jaxpipe.aot import compile_plan
from jaxpipe.config import ConfigError, PipelineConfig, get_preset
from jaxpipe.verify import choose_compiled, verify

MODEL = get_preset("small", num_layers=4)


@pytest.fixture(scope="module")
def searched():
    """A search for 4 devices and three candidates' compiled totals on forced CPU devices."""
    result = autotune.search(MODEL, autotune.Cluster(4, "tpu-v5p"), global_batch=16,
                             seq_len=64, top=3)
    totals = [
        compile_plan(k.plan, batch_size=16, seq_len=64, topology="cpu:4").memory["total"]
        for k in result.candidates
    ]
    return result, totals


def test_the_best_is_the_first_candidate_that_compiles_within_the_budget(searched):
    result, totals = searched
    assert len(totals) == 3
    roomy = verify(result, "cpu:4", count=3)  # a v5p's 95 GiB: the first fits, no more compile
    assert len(roomy.reports) == 1 and roomy.best is result.candidates[0]
    assert roomy.reports[0].memory["total"] == pytest.approx(totals[0])
    # A budget only the leanest of the three meets: the ones before it are compiled and
    # reported over it, the ones after it are not compiled.
    j = totals.index(min(totals))
    tight = verify(result, "cpu:4", count=3, capacity=totals[j])
    assert len(tight.reports) == j + 1 and tight.best is result.candidates[j]
    assert [tight.fits(r) for r in tight.reports] == [False] * j + [True]
    text = tight.table()
    assert text.count("over the budget") == j
    assert text.splitlines()[-1] == "best (compiled to fit): " + result.candidates[j].flags(
        "tpu-v5p")
    out = json.loads(tight.to_json())
    assert out["verified_best"] == j and len(out["verified"]) == j + 1
    assert out["candidates"][j]["mesh"] == json.loads(result.to_json())["candidates"][j]["mesh"]


def test_when_none_compiles_within_the_budget_the_table_says_what_to_try(searched):
    result, totals = searched
    none = verify(result, "cpu:4", count=2, capacity=min(totals) - 1)
    assert none.best is None and len(none.reports) == 2
    assert json.loads(none.to_json())["verified_best"] is None
    last = none.table().splitlines()[-1]
    assert "none of the first 2 candidates compiled within" in last and "--verify" in last


def test_a_topology_of_another_size_or_a_count_below_one_is_refused(searched):
    result, _ = searched
    with pytest.raises(ConfigError, match=r"cpu:2 has 2 devices but the search planned for 4"):
        verify(result, "cpu:2")
    with pytest.raises(ConfigError, match=r"--verify must be >= 1"):
        verify(result, "cpu:4", count=0)


def test_verify_flag_needs_auto_and_a_topology(capsys):
    assert plan.main(["--verify", "2"]) == 2
    assert "add --auto and --topology" in capsys.readouterr().err


def test_choosing_for_the_devices_present_trains_the_first_candidate_that_compiles():
    """On a CPU host the winner is trained as searched; compiled (as on accelerators), the
    first candidate whose step fits the devices' memory, here the search's own best."""
    devices = jax.devices()[:4]
    base = PipelineConfig(boundary_dtype="bfloat16")
    found, best = choose_compiled(MODEL, base, device="tpu-v5p", global_batch=16, seq_len=64,
                                  devices=devices)
    assert best is found.best and best.pipe_cfg.boundary_dtype == "bfloat16"
    assert all(k.pipe_cfg.boundary_dtype == "bfloat16" for k in found.candidates)
    checked, chosen = choose_compiled(MODEL, base, device="tpu-v5p", global_batch=16,
                                      seq_len=64, devices=devices, compile=True)
    assert len(checked.reports) == 1 and checked.fits(checked.reports[0])
    assert chosen.pipe_cfg == found.best.pipe_cfg
    assert checked.topology == f"4 x {devices[0].device_kind}"


@pytest.mark.slow
def test_timing_on_accelerators_times_only_candidates_that_compile_within_memory():
    """Compiled (as on accelerators) and timed: the compile goes on until two candidates fit,
    and the one to train is the faster measured of those two."""
    devices = jax.devices()[:4]
    timed, chosen = choose_compiled(MODEL, PipelineConfig(), device="cpu", global_batch=16,
                                    seq_len=64, devices=devices, compile=True, time=2)
    assert len(timed.measured_s) == 2 and chosen is timed.best
    assert chosen is timed.result.candidates[timed.ranked[0]]
    assert timed.measured_s[timed.ranked[0]] == min(timed.measured_s)


def test_the_topology_gives_the_device_count(capsys):
    """`plan --auto --topology cpu:4` plans for its 4 devices; the table ends with the
    compiled best."""
    args = ["--auto", "--model", "small", "--device", "tpu-v5p", "--topology", "cpu:4",
            "--global_batch", "16", "--seq_len", "64", "--top", "2", "--json"]
    assert plan.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["devices"] == 4 and out["device"] == "tpu-v5p" and out["verified_best"] == 0


@needs_libtpu
def test_a_tpu_topology_gives_the_device_profile(capsys):
    args = ["--auto", "--model", "small", "--topology", "v5p:2x2x1", "--global_batch", "16",
            "--seq_len", "64", "--top", "2"]
    assert plan.main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith("autotune: small on 4 x tpu-v5p")
    assert "compiled for v5p:2x2x1 (budget" in text and "best (compiled to fit): " in text
