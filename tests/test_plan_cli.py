"""Planner CLI on real model shapes (abstract: nothing is allocated)."""

import json

import pytest

from jaxpipe import plan as plan_cli
from jaxpipe.config import PipelineConfig, get_preset
from jaxpipe.partition import make_plan


def test_cli_gpt3_json_per_stage_params(capsys):
    argv = [
        "--model",
        "gpt3-175b",
        "--stages",
        "8",
        "--microbatches",
        "32",
        "--device",
        "tpu-v5p",
        "--method",
        "cost",
        "--seq_len",
        "256",
        "--json",
    ]
    assert plan_cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = get_preset("gpt3-175b")
    stages = out["stages"]
    assert len(stages) == 8 and sum(s["num_layers"] for s in stages) == 96
    assert sum(s["params"] for s in stages) == cfg.num_params()
    for s in stages:  # about 22B each: 12 blocks of 1.81B, plus the embedding on stage 0
        analytic = s["num_layers"] * cfg.block_params() + (s["stage"] == 0) * cfg.embed_params()
        analytic += (s["stage"] == 7) * cfg.head_params()
        assert s["params"] == analytic
        assert 20e9 < s["params"] < 24e9
    assert out["layout"].startswith("E+t*") and out["layout"].endswith("+H")
    assert out["bubble_fraction"] == pytest.approx(7 / 39)


def test_llama_65b_four_stages_params():
    cfg = get_preset("llama-65b", dtype="bfloat16")
    plan = make_plan(
        cfg,
        PipelineConfig(4, 8, schedule="1f1b", remat="layer"),
        "cost",
        batch_size=8,
        seq_len=256,
        device="h100",
    )
    assert sum(s.num_layers for s in plan.stages) == 80
    assert plan.layout.layer_counts == (20, 20, 20, 20)  # the head costs less than one block
    for s in plan.stages:
        assert 15e9 < s.params < 17.5e9
    assert sum(s.params for s in plan.stages) == cfg.num_params()


def test_cli_errors_exit_2(capsys):
    assert plan_cli.main(["--model", "tiny", "--device", "tpu-v9"]) == 2
    assert "unknown device" in capsys.readouterr().err
    assert plan_cli.main(["--model", "tiny", "--stages", "8"]) == 2
    assert "cannot fill" in capsys.readouterr().err
    assert plan_cli.main(["--model", "tiny", "--method", "greedy"]) == 2
    assert "unknown partition method" in capsys.readouterr().err


def test_profile_plan_uses_the_measured_layer_times(monkeypatch):
    from jaxpipe import partition

    cfg = get_preset("tiny").replace(num_layers=8)
    measured = {"block": 1.0, "embed": 0.5, "head": 4.5}
    calls = []
    monkeypatch.setattr(
        partition, "measure_layer_times", lambda *a, **k: calls.append(a) or measured
    )
    plan = make_plan(cfg, PipelineConfig(2, 2), "profile", batch_size=4, seq_len=8)
    assert len(calls) == 1 and plan.method == "profile"
    cm = plan.cost_model
    assert (cm.block_time, cm.embed_time, cm.head_time) == (1.0, 0.5, 4.5)
    # 8 blocks of 1 s, 0.5 s of embedding on stage 0, 4.5 s of head on stage 1: 6.5 s each.
    assert plan.layout.layer_counts == (6, 2)


@pytest.mark.slow  # compiles and times small stage programs on the host
def test_measured_stage_times_and_the_balance_check():
    from jaxpipe.balance import check_balance
    from jaxpipe.measure import measure_stage_times

    cfg = get_preset("tiny").replace(num_layers=6)
    pcfg = PipelineConfig(2, 2)
    plan = make_plan(cfg, pcfg, "uniform", batch_size=4, seq_len=8)
    lt = {"block": plan.cost_model.block_time, "embed": 0.0, "head": 0.0}
    measured = measure_stage_times(
        cfg, pcfg, plan.layout, batch_size=4, seq_len=8, reps=2, layer_times=lt
    )
    assert measured.layer_s == lt  # given layer times are used as they are
    ratio = max(measured.stage_s) / min(measured.stage_s)
    report = check_balance(plan, measured, threshold=ratio * 1.01)
    assert report.ratio == pytest.approx(ratio) and report.suggestion is None
    predicted = [t - plan.cost_model.transfer_time for t in plan.stage_times]
    assert report.predicted_s == pytest.approx(predicted)
    err = max(abs(p - m) / m for p, m in zip(predicted, measured.stage_s, strict=True))
    assert report.max_error == pytest.approx(err)
    unbalanced = check_balance(plan, measured, threshold=ratio * 0.99)
    assert unbalanced.suggestion is not None and unbalanced.suggestion.method == "measured"



def test_max_seq_len_flag(capsys):
    # A named device profile spares the CPU calibration.
    argv = ["--model", "tiny", "--stages", "2", "--seq_len", "128", "--device", "tpu-v5p",
            "--json"]
    assert plan_cli.main(argv) == 2
    assert capsys.readouterr().err == (
        "error: seq_len 128 exceeds the model's max_seq_len 64; use --seq_len <= 64 or raise "
        "the model's (--max_seq_len)\n"
    )
    args = plan_cli.parse_args([*argv, "--max_seq_len", "128", "--attention", "splash"])
    assert (args.max_seq_len, args.attention) == (128, "splash")


@pytest.mark.slow
def test_plan_with_a_raised_max_seq_len(capsys):
    argv = ["--model", "tiny", "--stages", "2", "--seq_len", "128", "--max_seq_len", "128",
            "--device", "tpu-v5p", "--json"]
    assert plan_cli.main(argv) == 0
    assert sum(s["num_layers"] for s in json.loads(capsys.readouterr().out)["stages"]) == 4
