"""Partitioner: optimal splits, memory model, plan report, errors, an uneven plan end to end."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import needs_devices

from jaxpipe import costs as C
from jaxpipe import model as M
from jaxpipe.balance import check_balance
from jaxpipe.buffers import buffer_plan
from jaxpipe.config import SCHEDULES, ConfigError, PipelineConfig, get_preset
from jaxpipe.costmodel import REMAT_COST, CostModel, scores_bytes
from jaxpipe.layout import StageLayout
from jaxpipe.measure import StageTimes
from jaxpipe.mesh import make_mesh
from jaxpipe.partition import (
    build_plan,
    device_counts,
    device_memory,
    in_flight,
    make_plan,
    virtual_counts,
    weight_grad_carry,
)
from jaxpipe.pipeline import Pipeline
from jaxpipe.schedule import BWD, FWD, WGT, build_table, executor_table
from jaxpipe.schedule import in_flight as table_in_flight
from jaxpipe.simulate import simulate
from jaxpipe.split import min_max_split, uniform_sizes


def _compositions(n, parts, lo=1):
    """Every way to write n as an ordered sum of `parts` integers >= lo."""
    for cuts in itertools.combinations(range(1, n - parts * (lo - 1)), parts - 1):
        sizes = np.diff((0,) + cuts + (n - parts * (lo - 1),))
        yield [int(x) + lo - 1 for x in sizes]


def _cm(**kw):
    base = dict(
        block_time=1.0,
        embed_time=0.5,
        head_time=3.0,
        transfer_time=0.0,
        block_params=100.0,
        embed_params=300.0,
        head_params=200.0,
        block_act=10.0,
        boundary_bytes=2.0,
        temp_bytes=0.0,
    )
    return CostModel(**{**base, **kw})


@pytest.mark.parametrize("layers,stages", [(30, 4), (61, 8), (126, 16), (7, 7)])
def test_uniform_never_empty_never_drops(layers, stages):
    sizes = uniform_sizes(layers, stages)
    assert sum(sizes) == layers and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    counts = device_counts(_cm(), PipelineConfig(stages, 4), layers, "uniform")
    assert counts == sizes


@pytest.mark.parametrize("seed", range(6))
def test_min_max_split_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    N, P = int(rng.integers(4, 10)), int(rng.integers(2, 5))
    t = rng.uniform(0.1, 2.0, N)
    first, last = rng.uniform(0, 3), rng.uniform(0, 6)
    prefix = np.concatenate([[0.0], np.cumsum(t)])
    extra = lambda p: (first if p == 0 else 0.0) + (last if p == P - 1 else 0.0)
    cost = lambda p, starts, end: prefix[end] - prefix[starts] + extra(p)
    sizes, neck = min_max_split(N, P, cost)
    assert sum(sizes) == N and min(sizes) >= 1

    def bottleneck(sz):
        ends = np.cumsum(sz)
        return max(
            prefix[e] - prefix[e - s] + extra(p)
            for p, (s, e) in enumerate(zip(sz, ends, strict=True))
        )

    brute = min(bottleneck(sz) for sz in _compositions(N, P))
    assert neck == pytest.approx(brute) and bottleneck(sizes) == pytest.approx(brute)


def test_min_max_split_respects_infeasible_parts():
    # Parts of more than 3 items do not "fit": the optimum must avoid them even if slower.
    t = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 5.0])
    prefix = np.concatenate([[0.0], np.cumsum(t)])
    cost = lambda p, s, e: np.where(e - s <= 3, prefix[e] - prefix[s], np.inf)
    sizes, neck = min_max_split(6, 2, cost)
    assert sizes == [3, 3] and neck == 7.0
    with pytest.raises(ConfigError):
        min_max_split(7, 2, lambda p, s, e: np.where(e - s <= 3, 1.0, np.inf))


@pytest.mark.parametrize("S,R,L", [(3, 2, 10), (2, 3, 9), (4, 1, 9)])
def test_circular_cost_split_is_optimal(S, R, L):
    """Device time = sum of its R virtual stages; compare with every virtual-stage split."""
    cm = _cm(transfer_time=0.1)
    pcfg = PipelineConfig(S, 4, R, "circular" if R > 1 else "gpipe")

    def device_neck(vcounts):
        V = S * R
        vt = [
            c * cm.block_time
            + cm.transfer_time
            + (v == 0) * cm.embed_time
            + (v == V - 1) * cm.head_time
            for v, c in enumerate(vcounts)
        ]
        return max(sum(vt[r * S + s] for r in range(R)) for s in range(S))

    counts = virtual_counts(device_counts(cm, pcfg, L, "cost"), R)
    assert sum(counts) == L and min(counts) >= 1
    brute = min(device_neck(c) for c in _compositions(L, S * R))
    assert device_neck(counts) == pytest.approx(brute)


def test_in_flight_per_schedule():
    assert [in_flight(PipelineConfig(4, 8), s) for s in range(4)] == [8] * 4
    assert [in_flight(PipelineConfig(4, 8, schedule="1f1b"), s) for s in range(4)] == [4, 3, 2, 1]
    assert in_flight(PipelineConfig(4, 2, schedule="1f1b"), 0) == 2
    # interleaved 1F1B with one repeat runs the 1F1B table: S - s in flight, not 2 (S - s) - 1.
    assert in_flight(PipelineConfig(2, 4, schedule="interleaved_1f1b"), 0) == 2
    # Zero-bubble stashes live until their W: ZB-H1 holds S on every stage, ZB-V 2S halves.
    assert [in_flight(PipelineConfig(4, 8, schedule="zb_h1"), s) for s in range(4)] == [4] * 4
    assert in_flight(PipelineConfig(4, 8, 2, schedule="zbv"), 0) == 4


def test_zbv_plan_places_layers_in_a_v():
    cfg = get_preset("tiny").replace(num_layers=8)
    pcfg = PipelineConfig(4, 8, 2, schedule="zbv")
    cm = _cm(embed_time=0.0, head_time=0.0)
    plan = build_plan(cfg, pcfg, StageLayout.uniform(8, 4, 2, "vee"), cm, "uniform", "test")
    assert [st.ranges for st in plan.stages][0] == ((0, 1), (7, 8))
    assert plan.layout_string().split(" | ")[0] == "E+t*1,t*1+H"  # the head is on stage 0
    one = build_plan(
        cfg, PipelineConfig(4, 8, schedule="1f1b"), StageLayout.uniform(8, 4), cm, "uniform",
        "test",
    )
    assert plan.step_time_s < 0.85 * one.step_time_s


def _pipeline_shapes():
    for schedule in SCHEDULES:
        for S in range(1, 9):
            for Mb in range(1, 2 * S + 2):
                repeats = {"circular": (1, 2, 3), "interleaved_1f1b": (1, 2, 3), "zbv": (2,)}
                for R in repeats.get(schedule, (1,)):
                    yield schedule, S, Mb, R


def _lockstep_ticks(table, compute_V, f=1 / 3, w=1 / 3):
    """Step time of a forward + backward table whose ticks each last their slowest op
    (a forward costs a share f of its virtual stage's forward + backward, a backward the rest;
    in a split table W a share w and B the rest)."""
    S, total = table.num_stages, 0.0
    w = w if table.split else 0.0
    for op, rep in zip(table.op, table.repeat, strict=True):
        share = np.where(op == FWD, f, np.where(op == BWD, 1 - f - w, 0.0))
        share = np.where(op == WGT, w, share)
        v = table.virtual_stage(np.arange(S), np.maximum(rep, 0))
        total += float((share * compute_V[v]).max())
    return total


def test_plan_reads_bubble_in_flight_and_step_time_off_the_executors_table():
    """Every schedule, S <= 8, M <= 2S + 1, R <= 3: the plan's bubble and per-stage in-flight
    count are those of the table `Pipeline` runs, and its step time is that table's ticks."""
    cfg = get_preset("tiny").replace(num_layers=26)
    cm = _cm(embed_time=0.0, head_time=0.0)
    checked = 0
    for schedule, S, Mb, R in _pipeline_shapes():
        pcfg = PipelineConfig(S, Mb, num_repeats=R, schedule=schedule)
        try:
            ran = build_table(schedule, S, Mb, R)  # what Pipeline.create builds and runs
            # Uneven when S x R does not divide 26.
            layout = StageLayout.uniform(26, S, R, ran.placement)
        except ConfigError as e:
            layout = StageLayout.uniform(26, S, R)
            with pytest.raises(ConfigError, match=str(e).split(";")[0][:40]):
                build_plan(cfg, pcfg, layout, cm, "uniform", "test")
            continue
        plan = build_plan(cfg, pcfg, layout, cm, "uniform", "test")
        where = (schedule, S, Mb, R)
        assert plan.bubble_fraction == pytest.approx(ran.bubble_fraction(), abs=1e-12), where
        forward_only = not (ran.op == BWD).any()
        # The ring executor keeps every forward's residuals for autodiff's backward.
        peak = [R * Mb] * S if forward_only else table_in_flight(ran).max(axis=0).tolist()
        assert [st.in_flight * R for st in plan.stages] == pytest.approx(peak), where
        compute_V = np.array(layout.layer_counts) * cm.block_time
        if forward_only:  # forward ticks, then autodiff runs the same ticks backward
            expected = 3 * _lockstep_ticks(ran, compute_V)
        else:
            expected = _lockstep_ticks(ran, compute_V)
        assert plan.step_time_s == pytest.approx(expected, rel=1e-9), where
        checked += 1
    assert checked > 400


def test_a_replayed_stage_keeps_every_layers_attention_scores_but_the_last():
    """Under remat stage the replay keeps each layer's residuals and, where the kernel
    materialises them, its scores (the last layer's are its program's temporaries)."""
    pcfg = PipelineConfig(3, 8, remat="stage")
    plain = device_memory(_cm(), pcfg, 4)
    assert device_memory(_cm(replay_scores=7.0), pcfg, 4) - plain == 3 * 7.0
    assert device_memory(_cm(replay_scores=7.0), pcfg.replace(remat="layer"), 4) == (
        device_memory(_cm(), pcfg.replace(remat="layer"), 4))
    cfg = get_preset("small")  # 4 heads, float32: scores and probabilities 4 + 4 bytes
    assert scores_bytes(cfg, 2, 128, 2) == 2 * 2 * 128 * 128 * 8
    assert scores_bytes(cfg.replace(dtype="bfloat16"), 2, 128, 1) == 2 * 4 * 128 * 128 * 6
    assert scores_bytes(cfg.replace(attention="splash"), 2, 128, 1) == 0.0


@pytest.mark.parametrize("schedule,R", [("zb_h1", 1), ("zbv", 2), ("1f1b", 1)])
def test_plan_splits_a_backward_by_the_cost_models_shares(schedule, R):
    """The forward, B and W shares of a virtual stage's time come from the cost model (a W a
    third of the backward here, a forward a quarter of all under remat): the step time is the
    table's ticks with those shares, and differs from equal thirds in split tables."""
    cfg = get_preset("tiny").replace(num_layers=8)
    pcfg = PipelineConfig(4, 8, R, schedule=schedule)
    layout = StageLayout.uniform(8, 4, R, build_table(schedule, 4, 8, R).placement)
    f, w = 0.25, 0.25
    plan = build_plan(cfg, pcfg, layout, _cm(embed_time=0.0, head_time=0.0, fwd_share=f,
                      wgt_share=w), "uniform", "test")
    thirds = build_plan(cfg, pcfg, layout, _cm(embed_time=0.0, head_time=0.0), "uniform", "test")
    table = build_table(schedule, 4, 8, R)
    compute_V = np.array(layout.layer_counts) * 1.0
    assert plan.step_time_s == pytest.approx(_lockstep_ticks(table, compute_V, f, w))
    if table.split:
        assert plan.step_time_s != pytest.approx(thirds.step_time_s)


def test_w_share_is_measured_from_the_split_backward():
    """W's share of a block's backward is its weight-gradient matmuls' FLOPs: about half of
    the backward's (dW and dx of every matmul cost alike; attention's score matmuls are B's),
    so under 0.5 for both block styles, and the cost model turns it into shares of a
    block's time (remat moves the recomputed forward into B)."""
    for style in ("tiny", "tiny-llama"):
        cfg = get_preset(style)
        costs = C.model_costs(cfg, PipelineConfig(), batch_size=2, seq_len=32)
        assert 0.2 < costs.w_share < 0.5, (style, costs.w_share)
        for remat, r in (("none", 1.0), ("layer", REMAT_COST)):
            pcfg = PipelineConfig(remat=remat)
            cm = CostModel.from_costs(costs, C.PROFILES["a100-80gb"], cfg, pcfg)
            assert cm.fwd_share == pytest.approx(1 / (3 * r))
            assert cm.wgt_share == pytest.approx(costs.w_share * 2 / (3 * r))


def test_plan_step_time_charges_the_slowest_stage_of_every_tick_and_the_link():
    """Uneven stages and a link time: lockstep ticks, compared with the event simulator."""
    cfg = get_preset("tiny").replace(num_layers=10)
    cm = _cm(embed_time=0.0, head_time=3.0, transfer_time=0.4)
    pcfg = PipelineConfig(4, 8, schedule="1f1b")
    layout = StageLayout(4, 1, (2, 3, 3, 2))
    plan = build_plan(cfg, pcfg, layout, cm, "cost", "test")
    compute = np.array([2.0, 3.0, 3.0, 5.0])
    table = build_table("1f1b", 4, 8)
    t = 0.0
    for row_op, row_busy in zip(table.op, table.busy, strict=True):
        if row_busy.any():
            costs = np.where(row_op == FWD, compute / 3, np.where(row_busy, 2 * compute / 3, 0))
            t += costs.max() + 0.2
    assert plan.step_time_s == pytest.approx(t)
    # A tick-synchronous step is never faster than stages that run as soon as inputs arrive.
    event = simulate(table, compute / 3, 2 * compute / 3, 0.2).step_time
    assert event < plan.step_time_s


def test_circular_bubble_with_fewer_microbatches_than_stages_is_the_executors_tables():
    """The forward + backward table: 18 ticks, 8 ops a stage (the ring's forward and its mirror
    took 22: the last stage's first backward waited for the ring's drain and refill)."""
    plan = build_plan(
        get_preset("tiny").replace(num_layers=8),
        PipelineConfig(4, 2, num_repeats=2, schedule="circular"),
        StageLayout.uniform(8, 4, 2),
        _cm(),
        "uniform",
        "test",
    )
    assert plan.bubble_fraction == pytest.approx(1 - 8 / 18)


def test_memory_plan_fits_and_names_smallest_stage_count():
    cm = _cm()
    pcfg = PipelineConfig(2, 4, remat="none")

    def need(slots):
        # Every device: 16 B/param x 100 per slot; the embedding and head (replicated over
        # `pipe`) with two gradients, 20 B/param; GPipe's 4 micro-batches x slots x 10 B.
        return 16 * 100 * slots + 20 * (300 + 200) + 4 * slots * 10

    assert device_memory(cm, pcfg, 5) == need(5)
    # Unconstrained, the head's stage takes fewer layers: (5, 3), 5 slots a device.
    assert device_counts(cm, pcfg, 8, "cost") == [5, 3]
    assert device_counts(cm, pcfg, 8, "memory", capacity=need(5)) == [5, 3]
    # One byte less and only 4 slots fit: the even split, though slower.
    assert device_counts(cm, pcfg, 8, "memory", capacity=need(5) - 1) == [4, 4]
    # 2 stages need 16,560 B, 3 need 14,920 B, 4 need 13,280 B.
    cap2 = 14_000
    with pytest.raises(ConfigError, match=r"smallest stage count that fits is 4"):
        device_counts(cm, pcfg, 8, "memory", capacity=cap2)
    device_counts(cm, pcfg.replace(num_stages=4), 8, "memory", capacity=cap2)
    with pytest.raises(ConfigError):
        device_counts(cm, pcfg.replace(num_stages=3), 8, "memory", capacity=cap2, any_fit=True)


def test_every_device_is_charged_the_fullest_stages_buffers():
    """One SPMD program: the plan charges every stage the same bytes, those of R x J slots
    with the deepest stash of the table (1F1B's first stage: S micro-batches) and the
    embedding and head, whatever the stage's own layers."""
    cm = _cm()
    pcfg = PipelineConfig(4, 8, schedule="1f1b")
    cfg = get_preset("tiny").replace(num_layers=10)
    plan = build_plan(cfg, pcfg, StageLayout(4, 1, (2, 3, 3, 2)), cm, "cost", "test")
    expect = 16 * 100 * 3 + 20 * (300 + 200) + 4 * 3 * 10
    assert [st.memory_bytes for st in plan.stages] == [expect] * 4
    assert [st.in_flight for st in plan.stages] == [4, 3, 2, 1]


def test_gradients_split_with_the_moments_but_form_whole_per_stage():
    """ZeRO-1 over 4 data devices, bfloat16 compute: per fp32 parameter the value (4 B), its
    bfloat16 copy (2), a quarter of the gradient (1) and of the moments (2), for blocks and the
    embedding and head alike; plus one stage's gradient whole in bfloat16 as a backward forms
    it (R x J x 100 x 2 B). Replicated, the same layout needs 18 B/param for blocks and 22 for
    the embedding and head (two gradients), and nothing formed beside."""
    cm = _cm(compute_bytes=2.0)
    zero1 = PipelineConfig(2, 4, 2, schedule="interleaved_1f1b", data_parallel=4, zero1=True)
    depth = max(in_flight(zero1, s) for s in range(2))
    stash = depth * 2 * 3 * 10
    assert device_memory(cm, zero1, 3) == 9 * 2 * 3 * 100 + 9 * 500 + stash + 2 * 3 * 100 * 2
    fsdp = zero1.replace(zero1=False, fsdp=True)  # block values split too: 1 + gathered 2
    assert device_memory(cm, fsdp, 3) == 6 * 2 * 3 * 100 + 9 * 500 + stash + 2 * 3 * 100 * 2
    replicated = zero1.replace(zero1=False)
    assert device_memory(cm, replicated, 3) == 18 * 2 * 3 * 100 + 22 * 500 + stash


def test_remat_shrinks_activation_memory():
    cm = _cm()
    full = device_memory(cm, PipelineConfig(3, 8), 4)
    layer = device_memory(cm, PipelineConfig(3, 8, remat="layer"), 4)
    stage = device_memory(cm, PipelineConfig(3, 8, remat="stage"), 4)
    # remat stage keeps one input per stage, but a backward replays the whole stage first.
    assert full - layer == 8 * 4 * (10 - 2) and layer - stage == 8 * 3 * 2 - 4 * 10


@pytest.mark.parametrize("schedule,R", [("zb_h1", 1), ("zbv", 2), ("1f1b", 1)])
def test_what_b_hands_w_under_remat_fills_the_executors_carry_slots(schedule, R):
    cm = _cm(compute_bytes=2.0, block_carry=70.0)
    for S in (2, 3, 4):
        for m in (S, 2 * S, 2 * S + 1):
            pcfg = PipelineConfig(S, m, R, schedule, remat="layer")
            table = executor_table(schedule, S, m, R, 1)
            slots = buffer_plan(table).num_carry if table.split else 0  # 1f1b: none held
            assert weight_grad_carry(cm, pcfg, 3) == slots * 3 * 70.0
            assert (slots > 0) == (schedule != "1f1b")
            assert weight_grad_carry(cm, pcfg.replace(remat="none"), 3) == 0.0
            held = device_memory(cm, pcfg, 3) - device_memory(cm, pcfg, 3 - 1)
            assert held >= slots * 70.0  # one layer slot fewer: one layer's carry fewer


def test_plan_report_fields():
    cm = _cm()
    pcfg = PipelineConfig(4, 8)
    cfg = get_preset("tiny").replace(num_layers=10)
    plan = build_plan(cfg, pcfg, StageLayout(4, 1, (2, 3, 3, 2)), cm, "cost", "test")
    assert plan.layout_string() == "E+t*2 | t*3 | t*3 | t*2+H"
    assert plan.stage_times == [2.5, 3.0, 3.0, 5.0]
    assert plan.bottleneck_ratio == pytest.approx(5.0 / 3.375)
    assert plan.bubble_fraction == pytest.approx(3 / 11)
    # Lockstep GPipe: fill ticks cost their slowest busy stage, then 8 ticks of the last one.
    assert plan.step_time_s == pytest.approx(2.5 + 3.0 + 3.0 + 8 * 5.0)
    assert [s.in_flight for s in plan.stages] == [8] * 4
    assert plan.padding_bytes == 2 * 100 * 16  # two padded slots (stages 0 and 3)
    d = json.loads(plan.to_json())
    assert [s["layers"] for s in d["stages"]] == [[[0, 2]], [[2, 5]], [[5, 8]], [[8, 10]]]
    assert sum(s["params"] for s in d["stages"]) == cfg.num_params()
    assert "t*3+H" not in str(plan) and "bottleneck" in str(plan)


def test_check_balance_suggests_repartition():
    cm = _cm()
    pcfg = PipelineConfig(4, 8)
    cfg = get_preset("tiny").replace(num_layers=12)
    plan = build_plan(cfg, pcfg, StageLayout.uniform(12, 4), cm, "uniform", "test")
    measured = StageTimes((3.0, 3.0, 3.0, 9.0), {"block": 1.0, "embed": 0.0, "head": 6.0})
    report = check_balance(plan, measured)
    assert report.ratio == pytest.approx(3.0)
    assert report.suggestion is not None
    assert report.suggestion.layout.layer_counts[-1] < 3
    assert max(report.suggestion.stage_times) < 9.0
    balanced = check_balance(plan, StageTimes((3.0,) * 4, measured.layer_s))
    assert balanced.suggestion is None


@pytest.mark.parametrize(
    "method,device,pcfg,match",
    [
        ("greedy", "cpu", PipelineConfig(2, 2), "unknown partition method"),
        ("cost", "tpu-v9", PipelineConfig(2, 2), "unknown device"),
        ("cost", "cpu", PipelineConfig(8, 2), "cannot fill"),
    ],
)
def test_make_plan_errors(method, device, pcfg, match):
    with pytest.raises(ConfigError, match=match):
        make_plan(get_preset("tiny"), pcfg, method, batch_size=4, seq_len=16, device=device)


def test_make_plan_nothing_fits():
    """llama-3-8b's embedding and head (1.05 B parameters, two gradients each) need 19.6 GiB
    on every device of the pipeline: no stage count fits a v5e's 16 GiB; the error says what
    splits them."""
    cfg = get_preset("llama-3-8b")
    with pytest.raises(ConfigError, match=r"embedding and head state alone .* take 19.6 GiB.*"
                       r"--tensor.*--zero1"):
        make_plan(cfg, PipelineConfig(2, 1), "memory", batch_size=1, seq_len=128, device="tpu-v5e")


@needs_devices(4)
def test_uneven_cost_plan_runs_in_pipeline():
    cfg = get_preset("tiny").replace(num_layers=8, vocab_size=2048)
    pcfg = PipelineConfig(4, 2)
    plan = make_plan(cfg, pcfg, "cost", batch_size=4, seq_len=8, device="tpu-v5p")
    counts = plan.layout.layer_counts
    assert sum(counts) == 8 and len(set(counts)) > 1, counts
    assert counts[-1] < max(counts)  # the head's stage holds fewer blocks
    pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[:4]), layout=plan.layout)
    params = M.init_params(cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (4, 9), 0, cfg.vocab_size)
    loss, grads = jax.jit(pipe.value_and_grad)(pipe.place(params), tokens)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: M.reference_loss(cfg, p, tokens)))(
        params
    )
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=1e-5)
    got = pipe.to_canonical(grads)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_cpu_profile_is_calibrated_on_the_models_own_layers(monkeypatch):
    from jaxpipe import costs

    tiny = get_preset("tiny")
    calls = []
    real = costs.layer_programs
    monkeypatch.setattr(costs, "layer_programs", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(costs, "_CPU_PROFILE", {})
    profile = costs.get_profile("cpu", tiny, 2, 16)
    assert calls == [(tiny, 2, 16)]
    assert costs.get_profile("cpu", tiny, 2, 16) is profile  # measured once per shape
    assert 0 < profile.peak_flops < np.inf and 0 < profile.head_flops < np.inf
    # The 8 forced devices' links and the block's recompute cost are measured, not assumed.
    assert 0 < profile.links.intra_latency < 0.1 and 0 < profile.links.intra_bandwidth < np.inf
    assert 0.3 < profile.remat_cost < 5.0
    # The roofline of one block is then its time as a pipeline runs it: one device busy a
    # lockstep tick that ends in a collective (on forced devices slower than the block alone),
    # up to timing noise. Another test process may share
    # the cores during either timing, so a few fresh calibrate-then-measure pairs are tried;
    # one of them must agree within 2x.
    pcfg = PipelineConfig(1, 1)
    block_cost = costs.model_costs(tiny, pcfg, batch_size=2, seq_len=16).block
    ticks = costs._on_devices(*real(tiny, 2, 16)["block"])["one"]
    ratios = []
    for attempt in range(3):
        if attempt:
            monkeypatch.setattr(costs, "_CPU_PROFILE", {})
            profile = costs.get_profile("cpu", tiny, 2, 16)
        measured = costs.best_times({"one": ticks})["one"] / len(jax.devices())
        ratios.append(block_cost.time(profile) / measured)
        if 0.5 < ratios[-1] < 2.0:
            break
    assert 0.5 < ratios[-1] < 2.0, ratios


def test_cpu_profiles_of_several_micro_batches_are_timed_in_one_round_robin(monkeypatch):
    from jaxpipe import costs

    tiny = get_preset("tiny")
    rounds = []
    real = costs.best_times
    monkeypatch.setattr(costs, "best_times",
                        lambda calls, *a, **k: rounds.append(set(calls)) or real(calls, *a, **k))
    monkeypatch.setattr(costs, "_CPU_PROFILE", {})
    profiles = costs.get_profiles("cpu", tiny, (1, 2), 16)
    # Every micro-batch's block, head and recomputed block, and the block in lockstep ticks
    # with one device busy and with all busy, in one timing.
    kinds = ("block", "head", "block_remat", "one", "all")
    model_rounds = [keys for keys in rounds if (1, "block") in keys]
    assert model_rounds == [{(b, kind) for b in (1, 2) for kind in kinds}]
    assert profiles[2] is costs.get_profile("cpu", tiny, 2, 16)  # measured once per shape
    for p in profiles.values():
        assert 0 < p.concurrency < 2 * len(jax.devices())
        assert 0 < p.links.reduce_latency < 0.1 and 0 < p.links.reduce_bandwidth < np.inf


def test_cpu_profile_of_a_model_too_large_to_run_here_uses_generic_kernels(monkeypatch):
    from jaxpipe import costs

    def refuse(*_):
        raise AssertionError("would allocate the model's layers")

    monkeypatch.setattr(costs, "layer_programs", refuse)
    monkeypatch.setattr(costs, "_CPU_PROFILE", {})
    monkeypatch.setattr(costs, "_block_rate", lambda *dims: 1e9 if dims[2] == 512 else 0.0)
    monkeypatch.setattr(costs, "_softmax_rate", lambda *dims: 2e9 if dims[1] == 512 else 0.0)
    profile = costs.get_profile("cpu", get_preset("gpt3-175b"), 1, 2048)
    assert (profile.peak_flops, profile.head_flops) == (1e9, 2e9)


def test_best_times_samples_short_programs_as_back_to_back_batches():
    import time

    from jaxpipe.costs import best_times

    calls = {"short": 0, "long": 0}

    def make(name, seconds):
        def fn():
            calls[name] += 1
            time.sleep(seconds)
            return jnp.zeros(())

        return fn

    # A 1 ms sleep can take several ms on a loaded host: min_seconds leaves room for that.
    t = best_times({"short": (make("short", 0.001), ()), "long": (make("long", 0.15), ())},
                   reps=3, min_seconds=0.1)
    assert calls["long"] == 2 + 3  # already longer than min_seconds: one call per sample
    assert calls["short"] >= 2 + 3 * 3  # several calls per sample
    assert 0.001 <= t["short"] < 0.03 and 0.15 <= t["long"] < 0.6
