"""Autotuner: exact pruning, memory, tensor within a node, what fits when nothing does."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import hide_libtpu, needs_libtpu

from jaxpipe import autotune, topology
from jaxpipe import plan as plan_cli
from jaxpipe.attention import compiling_for
from jaxpipe.autotune import Cluster, LayerCosts, plan_for, search
from jaxpipe.config import ConfigError, PipelineConfig, get_preset
from jaxpipe.costmodel import concurrency, recompute_factor, tensor_factor
from jaxpipe.costs import GiB, LayerCost, ModelCosts

MODEL = get_preset("tiny", dtype="bfloat16")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def costs():
    """The tiny model's costs without compiling: per micro-batch sample, a block of 1 MFLOP,
    the head 2 MFLOPs, 1 MB of bytes and 0.1 MB of saved activations each."""
    def at(b):
        layer = LayerCost(1e6 * b, 1e6 * b, 0.0, MODEL.block_params(), 0.0, 1e5 * b, 1e5 * b)
        head = dataclasses.replace(layer, flops=2e6 * b, params=MODEL.head_params())
        return ModelCosts(layer, layer, head, 64 * 32 * 2 * b, b, 64)

    return LayerCosts(at(1), at(2))


def test_pruned_search_finds_the_exhaustive_optimum(costs):
    cluster = Cluster(8, "h100", devices_per_node=4)
    kw = dict(global_batch=16, seq_len=64, layer_costs=costs)
    best = search(MODEL, cluster, top=3, **kw)
    every = search(MODEL, cluster, top=10**6, **kw)  # the bound never stops this one
    assert every.planned > best.planned
    times = [k.plan.step_time_s for k in every.candidates]
    assert times == sorted(times)
    assert [k.plan.step_time_s for k in best.candidates] == pytest.approx(times[:3])
    for k in every.candidates:
        p = k.pipe_cfg
        assert p.num_devices == 8 and p.tensor_parallel <= 4  # tensor stays inside a node
        assert MODEL.num_heads % p.tensor_parallel == 0
        assert k.memory_bytes <= 80e9


def test_memory_limit_drops_candidates_and_forces_remat(costs):
    kw = dict(global_batch=64, seq_len=64, layer_costs=costs, top=10**6)
    roomy = search(MODEL, Cluster(4, "h100"), **kw)
    need = sorted(k.memory_bytes for k in roomy.candidates)
    cap = need[len(need) // 2]  # half of them fit
    tight = search(MODEL, Cluster(4, "h100", memory_gib=cap / GiB), **kw)
    assert all(k.pipe_cfg.remat == "none" for k in roomy.candidates)
    assert any(k.pipe_cfg.remat != "none" for k in tight.candidates)
    assert all(k.memory_bytes <= cap * (1 + 1e-9) for k in tight.candidates)
    assert tight.best.plan.step_time_s >= roomy.best.plan.step_time_s


def test_state_split_over_data_fits_what_replicated_state_does_not(costs):
    """Below the least memory any replicated-state candidate needs, ZeRO-1 and FSDP candidates
    still fit, each taken only where its replicated twin does not, and the best is faster."""
    kw = dict(global_batch=64, seq_len=64, layer_costs=costs, top=10**6)
    roomy = search(MODEL, Cluster(8, "h100"), splits=("none",), **kw)
    cap = 0.999 * min(k.memory_bytes for k in roomy.candidates)
    tight = Cluster(8, "h100", memory_gib=cap / GiB)
    replicated = search(MODEL, tight, splits=("none",), **kw)
    split = search(MODEL, tight, **kw)
    assert split.best.plan.step_time_s < replicated.best.plan.step_time_s
    seen = set()
    for k in split.candidates:
        p = k.pipe_cfg
        assert k.memory_bytes <= cap * (1 + 1e-9)
        seen.add(k.state_split)
        if k.state_split == "none":
            continue
        assert p.data_parallel > 1 and f"--{k.state_split}" in k.flags("h100")
        b = k.global_batch // (p.num_microbatches * p.data_parallel)
        twin = plan_for(MODEL, p.replace(zero1=False, fsdp=False), costs.at(b, p.tensor_parallel),
                        tight.profile(MODEL, b, 64))
        assert twin is None  # the replicated state of the same configuration does not fit
    assert {"zero1", "none"} <= seen
    with pytest.raises(ConfigError, match="state splits must be among none, zero1, fsdp"):
        search(MODEL, tight, splits=("zero3",), **kw)


def test_nothing_fits_names_the_devices_that_would(costs):
    with pytest.raises(ConfigError, match=r"needs at least \d+ devices \(try --devices \d+\)"):
        search(MODEL, Cluster(2, "h100", memory_gib=1e-5), global_batch=8, seq_len=64,
               layer_costs=costs)


@pytest.mark.slow
def test_cli_prints_the_best_as_train_lm_flags(capsys):
    argv = ["--auto", "--model", "tiny", "--devices", "4", "--device", "h100", "--global_batch",
            "8", "--seq_len", "64", "--top", "2", "--json"]
    assert plan_cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["candidates"]) == 2
    best = out["candidates"][0]
    mesh = best["mesh"]
    assert mesh["data"] * mesh["pipe"] * mesh["tensor"] == 4
    cmd = out["best_command"]
    assert f"--num_stages {mesh['pipe']} " in cmd and f"--schedule {best['schedule']} " in cmd
    assert plan_cli.main(["--auto", "--model", "tiny", "--global_batch", "8"]) == 2
    assert "--auto needs --devices" in capsys.readouterr().err


def test_cluster_flags_need_auto(capsys):
    assert plan_cli.main(["--model", "tiny", "--devices", "8"]) == 2
    assert "--devices plan(s) a cluster for the autotuner; add --auto" in capsys.readouterr().err


@pytest.mark.slow
def test_train_lm_auto_runs_the_winner(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    cmd = [
        sys.executable, str(ROOT / "experiments" / "train_lm.py"), "--auto", "--devices", "2",
        "--model", "tiny", "--num_layers", "2", "--batch_size", "4", "--seq_len", "16",
        "--steps", "2", "--log_every", "1", f"--workdir={workdir}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "autotune: tiny on 2 x cpu" in proc.stdout and "step 2/2" in proc.stdout
    best = next(line for line in proc.stdout.splitlines() if line.strip().startswith("1 "))
    mesh = best.split()[1]  # DxPxT of the first candidate
    pipeline = json.loads((workdir / "config.json").read_text())["pipeline"]
    ran = f"{pipeline['data_parallel']}x{pipeline['num_stages']}x{pipeline['tensor_parallel']}"
    assert ran == mesh


@pytest.mark.parametrize("kw", [dict(num_devices=0), dict(devices_per_node=0),
                                dict(memory_gib=-1.0)])
def test_bad_cluster_names_the_flag(kw):
    with pytest.raises(ConfigError, match=r"--(devices|devices_per_node|memory_gib) must be"):
        Cluster(**{"num_devices": 4, "device": "h100", **kw})


def test_zbv_plans_place_their_layers_in_a_vee(costs):
    """Every candidate's layout puts its virtual stages where its table runs them (a zbv plan
    on the 'loop' placement would be refused by the executor it proposes)."""
    found = search(MODEL, Cluster(4, "h100"), global_batch=16, seq_len=64, layer_costs=costs,
                   top=10**6, schedules=("zbv", "1f1b"))
    zbv = [k for k in found.candidates if k.pipe_cfg.schedule == "zbv"]
    assert zbv and all(k.plan.layout.placement == "vee" for k in zbv)
    assert all(k.plan.layout.placement == "loop" for k in found.candidates if k not in zbv)
    for k in zbv:
        S = k.pipe_cfg.num_stages
        # device d holds virtual stages d and 2S - 1 - d
        assert [sorted(row) for row in k.plan.layout.v_SR.tolist()] == [
            sorted((d, 2 * S - 1 - d)) for d in range(S)
        ]


def test_fit_makes_the_profile_predict_the_measured_steps(monkeypatch):
    """`fit_executor` scales a profile's compute rate and concurrency until it predicts the
    steps with one stage busy at a time, with every stage busy, and with every device on `data`,
    and its recompute cost until it predicts the all-`data` step with remat over the one without
    on one stage, and the all-`pipe` ones on S stages (one busy at a time, and all), with fused
    and with split backward ops;
    the search then ranks with the fitted profile: recomputing measured cheaper than keeping,
    remat comes first."""
    def at(b):  # compute-bound layers: 1 TFLOP per sample
        layer = LayerCost(1e12 * b, 1e6 * b, 0.0, MODEL.block_params(), 0.0, 1e5 * b, 1e5 * b)
        return ModelCosts(layer, layer, layer, 64 * 32 * 2 * b, b, 64)

    big = LayerCosts(at(1), at(2))
    shared = dataclasses.replace(Cluster(4, "h100").profile(), name="cpu", concurrency=2.0)
    profiles = {b: shared for b in (1, 2, 4, 8, 16)}
    runs, measured = [], []

    def steps(batch, reps=5):
        runs[:] = batch
        return measured

    monkeypatch.setattr(autotune, "measure_steps", steps)
    measured[:] = [1.0] * 10
    before = autotune.fit_executor(MODEL, big, profiles, 4, 16, 64, tensor=2).predicted_s
    p = [r.pipe_cfg for r in runs]
    assert [(q.data_parallel, q.num_stages, q.tensor_parallel, q.num_microbatches, q.schedule,
             q.remat) for q in p] == [
        (1, 4, 1, 1, "gpipe", "none"), (1, 4, 1, 8, "gpipe", "none"),
        (4, 1, 1, 2, "gpipe", "none"), (4, 1, 1, 2, "gpipe", "layer"),
        (1, 4, 1, 1, "gpipe", "layer"), (1, 4, 1, 8, "gpipe", "layer"),
        (1, 4, 1, 8, "zb_h1", "none"), (1, 4, 1, 8, "zb_h1", "layer"),
        (2, 1, 2, 4, "gpipe", "none"), (2, 1, 2, 4, "gpipe", "layer")]
    # the tensor pair at the all-`data` pair's micro-batch
    assert {r.global_batch // (r.pipe_cfg.num_microbatches * r.pipe_cfg.data_parallel)
            for r in runs[2:4] + runs[8:]} == {2}
    scales = [1.5, 2.0, 2.5, 2.0, 1.8, 2.2, 2.0, 2.6, 2.2, 1.7]
    measured[:] = [b * x for b, x in zip(before, scales, strict=True)]
    fit = autotune.fit_executor(MODEL, big, profiles, 4, 16, 64, tensor=2)
    assert fit.efficiency == pytest.approx(1 / 1.5, rel=0.02)
    assert 0.5 < fit.concurrency_scale < 1 and fit.remat_scale < 1 < fit.staged_remat_scale
    assert fit.staged_remat_scale < fit.split_remat_scale
    after = []
    for run in runs:
        q = run.pipe_cfg
        b = run.global_batch // (q.num_microbatches * q.data_parallel)
        plan = plan_for(MODEL, q, big.at(b, q.tensor_parallel), fit.fitted(shared), fit=False)
        after.append(plan.step_time_s)
    assert after[:3] == pytest.approx(measured[:3], rel=0.01)
    assert after[6] == pytest.approx(measured[6], rel=0.01)  # the split table's blocks
    assert after[8] == pytest.approx(measured[8], rel=0.01)  # the tensor-parallel blocks
    assert fit.tensor == 2 and fit.tensor_scale != 1 and fit.tensor_remat_scale < 1
    assert fit.split_cost != 1 and fit.fitted(shared).fit.split_cost == fit.split_cost
    # the fitted recompute costs hold at every micro-batch, whatever each profile measured
    other = dataclasses.replace(shared, remat_cost=1.3 * (shared.remat_cost or 4 / 3))
    assert fit.fitted(other).remat_cost == fit.fitted(shared).remat_cost
    assert fit.fitted(other).fit == fit.fitted(shared).fit
    assert 0.5 < fit.data_concurrency_scale < 1  # all on `data` ran slower than on `pipe`
    for kept, recomputed in ((2, 3), (0, 4), (1, 5), (6, 7), (8, 9)):
        assert after[recomputed] / after[kept] == pytest.approx(
            measured[recomputed] / measured[kept], rel=0.01)
    # between the all-`pipe` and the all-`data` concurrency: on log(data)
    conc = [concurrency(fit.fitted(shared), d) for d in (1, 2, 4, 8)]
    assert conc[0] == fit.fitted(shared).concurrency > conc[1] > conc[2] == conc[3]
    assert conc[1] == pytest.approx((conc[0] * conc[2]) ** 0.5)
    # between one stage and four the recompute cost is interpolated on log(stages)
    two = fit.fitted(shared)
    ends = recompute_factor(two, "layer", 1), recompute_factor(two, "layer", 4)
    assert ends[0] < recompute_factor(two, "layer", 2) < ends[1]
    assert recompute_factor(two, "layer", 2) == pytest.approx((ends[0] * ends[1]) ** 0.5)
    assert recompute_factor(two, "layer", 8) == ends[1] and recompute_factor(two, "none", 4) == 1
    assert recompute_factor(two, "layer", 2, split=True) == two.fit.remat_split > ends[1]
    # with fewer micro-batches than stages, fewer stages run at once: between the cost with one
    # busy (M = 1, dearer here) and with all, on log(busy)
    alone = recompute_factor(two, "layer", 4, busy=1)
    assert alone == two.fit.remat_alone > ends[1] == recompute_factor(two, "layer", 4, busy=4)
    assert recompute_factor(two, "layer", 4, busy=2) == pytest.approx((alone * ends[1]) ** 0.5)
    assert recompute_factor(two, "layer", 4, split=True, busy=1) == two.fit.remat_split
    # the tensor factor: 1 on one rank, the fitted one on the references' 2 and held beyond
    plain = fit.tensor_scale
    assert [tensor_factor(two, t, "none") for t in (1, 2, 4)] == [1.0, plain, plain]
    assert tensor_factor(two, 2, "layer") == pytest.approx(plain * fit.tensor_remat_scale)
    assert tensor_factor(fit.fitted(shared), 2, "stage") == tensor_factor(two, 2, "layer")

    own = Cluster(4, "h100").profiles(MODEL, (1, 2, 4, 8, 16), 64)  # devices of their own
    measured[:] = [1.0] * 10
    before = autotune.fit_executor(MODEL, big, own, 4, 16, 64, tensor=4).predicted_s
    assert runs[-1].pipe_cfg.tensor_parallel == 4  # the largest degree dividing the devices
    scales = [1.5, 1.5, 1.5, 0.9, 0.9, 0.9, 1.5, 0.9, 1.5, 0.9]
    measured[:] = [b * x for b, x in zip(before, scales, strict=True)]
    found = search(MODEL, Cluster(4, "h100"), global_batch=16, seq_len=64, layer_costs=big,
                   top=5, fit_steps=True)
    assert found.fit.concurrency_scale == 1  # devices of their own: nothing shared to fit
    assert found.fit.remat_scale < 0.75  # below 1 / (4/3): recomputing is cheaper
    assert found.fit.staged_remat_scale < 0.75 and found.fit.split_remat_scale < 0.75
    assert found.fit.alone_remat_scale < 0.75
    assert all(k.pipe_cfg.remat == "layer" for k in found.candidates)
    assert "fitted to measured steps (predicted -> measured: 1x4x1 gpipe M=1" in found.table()
    assert search(MODEL, Cluster(4, "h100"), global_batch=16, seq_len=64, layer_costs=big,
                  top=5).fit is None  # a named device's profile is not fitted by default
    # a model that does not train on this host is planned with its profile as measured
    assert autotune.steps_run_here(MODEL, 16, 64)
    # on one device the M = 2S and the all-`data` references are the same steps, measured once
    measured[:] = [0.3, 0.5, 0.4]
    one = autotune.fit_executor(MODEL, big, own, 1, 16, 64)
    assert len(runs) == 3 and one.measured_s == (0.3, 0.5, 0.5, 0.4)
    assert one.stages == 1 and one.fitted(shared).fit is None
    assert not autotune.steps_run_here(get_preset("llama-3-70b"), 16, 64)


AUTO_TPU = ["--auto", "--model", "small-llama", "--devices", "8", "--device", "tpu-v5p",
            "--global_batch", "8", "--seq_len", "128", "--top", "2"]


@needs_libtpu
def test_planning_for_a_tpu_costs_the_layers_as_its_compiler_does(capsys):
    """For a TPU profile the search compiles the layers for a compile-only chip of that
    generation: the splash kernel is allowed on this CPU host, the best candidate is the plan of
    the TPU-compiled costs (not of the host's), and its train_lm.py command names the kernel."""
    assert plan_cli.main([*AUTO_TPU, "--attention", "splash", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["costed_on"] == "TPU v5" and out["attention"] == "splash"
    assert out["best_command"].endswith(" --attention splash")
    best = out["candidates"][0]
    cfg = get_preset("small-llama", dtype="bfloat16", attention="splash")
    mesh = best["mesh"]
    pcfg = PipelineConfig(mesh["pipe"], best["num_microbatches"], best["num_repeats"],
                          best["schedule"], best["remat"], data_parallel=mesh["data"],
                          tensor_parallel=mesh["tensor"], embed_head=best["embed_head"],
                          **autotune.STATE_SPLITS[best["state_split"]])
    profile = Cluster(8, "tpu-v5p").profile(cfg, best["microbatch_size"], 128)
    chip, platform = topology.costing_target("tpu-v5p")
    with compiling_for(platform):
        tpu = LayerCosts.compile(cfg, 128, chip).at(best["microbatch_size"], mesh["tensor"])
    plan = plan_for(cfg, pcfg, tpu, profile)
    assert plan.step_time_s == pytest.approx(best["step_time_s"], rel=1e-9)
    assert max(st.memory_bytes for st in plan.stages) == pytest.approx(best["memory_bytes"])
    host = LayerCosts.compile(cfg.replace(attention="xla"), 128).at(
        best["microbatch_size"], mesh["tensor"])
    assert host.block.temp_bytes != tpu.block.temp_bytes  # the two compilers differ


def test_splash_for_a_tpu_without_libtpu_names_the_install(monkeypatch, capsys):
    hide_libtpu(monkeypatch)
    assert plan_cli.main([*AUTO_TPU, "--attention", "splash"]) == 2
    err = capsys.readouterr().err
    assert "needs libtpu" in err and topology.TPU_EXTRA in err, err
