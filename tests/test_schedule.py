"""Schedule tables: validity, bubble arithmetic, buffer plans, simulation, charts, CLI."""

import json

import numpy as np
import pytest

from jaxpipe import viz
from jaxpipe.buffers import buffer_plan
from jaxpipe.config import ConfigError, PipelineConfig
from jaxpipe.schedule import (
    BWD,
    FWD,
    IDLE,
    NEXT,
    PREV,
    SELF,
    WGT,
    ScheduleTable,
    build_table,
    crossing_ticks,
    full_table,
    fused_backward,
    in_flight,
    ring_table,
    sends,
    validate,
    validate_ring,
)
from jaxpipe.simulate import simulate

GRID = [(S, M) for S in (1, 2, 3, 4) for M in (1, 2, 3, 4, 5, 8)]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("S,M", GRID)
def test_bubble_matches_formula_single_pass(schedule, S, M):
    table = full_table(schedule, S, M)
    assert table.bubble_fraction() == pytest.approx((S - 1) / (M + S - 1), abs=1e-12)
    assert table.num_ticks == 2 * (M + S - 1)


@pytest.mark.parametrize("schedule", ["circular", "interleaved_1f1b"])
@pytest.mark.parametrize(
    "S,R,k", [(2, 2, 1), (3, 2, 1), (3, 3, 2), (4, 2, 1), (4, 2, 2), (4, 3, 2)]
)
def test_bubble_matches_formula_virtual_stages(schedule, S, R, k):
    M = k * S
    table = full_table(schedule, S, M, R)
    assert table.bubble_fraction() == pytest.approx((S - 1) / (R * M + S - 1), abs=1e-12)


@pytest.mark.parametrize(
    "S,M,R", [(1, 3, 1), (2, 5, 1), (4, 4, 1), (3, 3, 2), (4, 8, 2), (4, 4, 3)]
)
def test_ring_tables_bubble(S, M, R):
    table = build_table("gpipe" if R == 1 else "circular", S, M, R)
    assert table.bubble_fraction() == pytest.approx((S - 1) / (R * M + S - 1), abs=1e-12)


def test_1f1b_stashes_at_most_S_minus_s():
    S, M = 4, 16
    peak_S = in_flight(full_table("1f1b", S, M)).max(axis=0)
    np.testing.assert_array_equal(peak_S, [S - s for s in range(S)])
    assert in_flight(full_table("gpipe", S, M)).max() == M
    validate(full_table("1f1b", S, M), max_in_flight=S)
    with pytest.raises(ConfigError, match="stashed forwards"):
        validate(full_table("gpipe", S, M), max_in_flight=S)


def test_1f1b_fewer_microbatches_than_stages():
    table = full_table("1f1b", 4, 2)
    assert table.bubble_fraction() == pytest.approx(3 / 5)
    assert in_flight(table).max() == 2


def test_interleaved_needs_multiple_of_stages():
    with pytest.raises(ConfigError, match="multiple of num_stages 4"):
        full_table("interleaved_1f1b", 4, 6, 2)
    with pytest.raises(ConfigError, match="interleaved_1f1b"):
        full_table("1f1b", 4, 8, 2)


def test_validator_marks_missing_duplicate_and_early_ops():
    table = full_table("1f1b", 3, 3)
    t, s = map(int, np.argwhere(table.op == BWD)[-1])
    missing = ScheduleTable(
        table.name,
        3,
        3,
        1,
        np.where(np.arange(table.num_ticks)[:, None] == t, IDLE, table.op),
        table.micro,
        table.repeat,
    )
    with pytest.raises(ConfigError, match="never runs B"):
        validate(missing)
    # Stage 1 repeats stage 1's first forward at its first idle tick.
    t0 = int(np.argwhere(table.op[:, 1] == FWD)[0, 0])
    idle = int(np.argwhere(table.op[:, 1] == IDLE)[-1, 0])
    dup = ScheduleTable(
        table.name, 3, 3, 1, table.op.copy(), table.micro.copy(), table.repeat.copy()
    )
    dup.op[idle, 1], dup.micro[idle, 1], dup.repeat[idle, 1] = FWD, 0, 0
    with pytest.raises(ConfigError, match=r"runs twice[\s\S]*\[F0\]"):
        validate(dup)
    # A forward on stage 1 at the same tick as its input on stage 0: too early.
    early = ScheduleTable(
        table.name, 3, 3, 1, table.op.copy(), table.micro.copy(), table.repeat.copy()
    )
    early.op[t0, 1], early.micro[t0, 1], early.repeat[t0, 1] = IDLE, -1, -1
    early.op[0, 1], early.micro[0, 1], early.repeat[0, 1] = FWD, 0, 0
    with pytest.raises(ConfigError, match=r"tick 0, stage 1[\s\S]*runs before F"):
        validate(early)
    msg = ""
    try:
        validate(early)
    except ConfigError as e:
        msg = str(e)
    assert "stage 1:" in msg and "[F0]" in msg.splitlines()[2]


@pytest.mark.parametrize(
    "args",
    [
        ("1f1b", 4, 8, 1),
        ("gpipe", 3, 4, 1),
        ("interleaved_1f1b", 3, 6, 2),
        ("1f1b", 4, 2, 1),
        ("zb_h1", 4, 6, 1),
        ("zbv", 3, 5, 2),
        ("zbv", 2, 2, 2),
    ],
)
def test_sends_are_taken_exactly_where_a_value_crosses(args):
    """A channel's send runs at tick t iff some stage's op at t hands its output to an op on
    another device along that channel (forward: F of v to v + 1; backward: B of v to v - 1)."""
    table = full_table(*args)
    plan = buffer_plan(table)
    V = table.num_stages * table.num_repeats
    want = {(FWD, NEXT): set(), (FWD, PREV): set(), (BWD, NEXT): set(), (BWD, PREV): set()}
    for t, s in zip(*np.nonzero(table.busy), strict=True):
        op, v = int(table.op[t, s]), int(table.virtual_stage(int(s), int(table.repeat[t, s])))
        dst = v + 1 if op == FWD else v - 1
        if op in (FWD, BWD) and 0 <= dst < V and table.channel(v, dst) != SELF:
            want[(op, table.channel(v, dst))].add(int(t))
    for op, writes in ((FWD, plan.act_write), (BWD, plan.grad_write)):
        taken = sends(table)[op]
        for ch in (NEXT, PREV):
            assert set(np.nonzero(taken[ch])[0].tolist()) == want[(op, ch)], (op, ch)
        # the buffer plan's inboxes fill the tick after each send
        assert ((writes[:, 1:] >= 0).any(axis=2) == taken[:, :-1]).all()
    # 1F1B-family tables leave some ticks without a send on a channel
    assert sum(len(w) for w in want.values()) < 2 * table.num_ticks


@pytest.mark.parametrize(
    "args",
    [
        ("1f1b", 4, 8, 1),
        ("interleaved_1f1b", 3, 6, 2),
        ("1f1b", 4, 2, 1),
        ("zb_h1", 4, 6, 1),
        ("zbv", 3, 5, 2),
        ("zbv", 2, 2, 2),
        ("zb_h1", 2, 4, 1),
    ],
)
def test_buffer_plan_replays(args):
    """Replays the plan slot by slot: every read finds exactly the value it expects."""
    table = full_table(*args)
    plan = buffer_plan(table)
    S, V = table.num_stages, table.num_stages * table.num_repeats
    fused = fused_backward(table)  # pairs run as one backward: B leaves W no carry
    assert (plan.num_wres if table.split else plan.num_res) == in_flight(table).max()
    act = [dict() for _ in range(S)]
    grad = [dict() for _ in range(S)]
    res = [dict() for _ in range(S)]
    wres = [dict() for _ in range(S)]  # split tables: the residuals W reads too
    carry = [dict() for _ in range(S)]
    # What each stage sent on each channel at the previous tick: NEXT goes to s + 1, PREV to
    # s - 1, SELF stays.
    sent_f = sent_b = [[None] * 3 for _ in range(S)]
    source = {NEXT: lambda s: (s - 1) % S, PREV: lambda s: (s + 1) % S, SELF: lambda s: s}
    for t in range(table.num_ticks):
        for s in range(S):
            for ch in (NEXT, PREV, SELF):
                if plan.act_write[ch, t, s] >= 0:
                    act[s][plan.act_write[ch, t, s]] = sent_f[source[ch](s)][ch]
                if plan.grad_write[ch, t, s] >= 0:
                    grad[s][plan.grad_write[ch, t, s]] = sent_b[source[ch](s)][ch]
        sent_f, sent_b = [[None] * 3 for _ in range(S)], [[None] * 3 for _ in range(S)]
        for s in range(S):
            o, m = table.op[t, s], int(table.micro[t, s])
            v = int(table.virtual_stage(s, int(table.repeat[t, s])))
            if o == FWD:
                if v > 0:
                    assert act[s].pop(plan.act_read[t, s]) == (m, v - 1)
                assert plan.res_slot[t, s] not in res[s]
                res[s][plan.res_slot[t, s]] = (m, v)
                if table.split:
                    assert plan.wres_slot[t, s] not in wres[s]
                    wres[s][plan.wres_slot[t, s]] = (m, v)
                if v < V - 1:
                    sent_f[s][table.channel(v, v + 1)] = (m, v)
                if v == V - 1:
                    assert plan.head_write[t, s] not in grad[s]
                    grad[s][plan.head_write[t, s]] = (m, v + 1)
            elif o == BWD:
                assert res[s].pop(plan.res_slot[t, s]) == (m, v)
                if table.split:
                    assert wres[s][plan.wres_slot[t, s]] == (m, v)
                assert grad[s].pop(plan.grad_read[t, s]) == (m, v + 1)
                if v > 0:
                    sent_b[s][table.channel(v, v - 1)] = (m, v)
                if table.split and fused[t, s]:
                    assert plan.carry_slot[t, s] == -1
                elif table.split:
                    assert plan.carry_slot[t, s] not in carry[s]
                    carry[s][plan.carry_slot[t, s]] = (m, v)
            elif o == WGT:
                assert wres[s].pop(plan.wres_slot[t, s]) == (m, v)
                if not fused[t, s]:
                    assert carry[s].pop(plan.carry_slot[t, s]) == (m, v)
    assert all(not d for d in act + grad + res + wres + carry)


@pytest.mark.parametrize(
    "args",
    [("zb_h1", 2, 4, 1), ("zb_h1", 2, 7, 1), ("zb_h1", 4, 8, 1), ("zb_h1", 3, 2, 1),
     ("zbv", 2, 4, 2), ("zbv", 3, 5, 2), ("1f1b", 2, 4, 1), ("interleaved_1f1b", 2, 4, 2)],
)
def test_fused_pairs_keep_the_stages_meeting_points(args):
    """A B and its W run as one backward only where that changes nothing another stage sees:
    the W is the stage's next op and no tick from the B's to the one before the W's sends a
    value across stages (`crossing_ticks`, the ticks the executor's sends run on)."""
    table = full_table(*args)
    fused = fused_backward(table)
    plan = buffer_plan(table)
    crossing = crossing_ticks(table)
    arrive = np.zeros(table.num_ticks, bool)  # values reaching another stage's inbox next tick
    for writes in (plan.act_write, plan.grad_write):
        arrive[:-1] |= (writes[[NEXT, PREV], 1:] >= 0).any(axis=(0, 2))
    assert (crossing == arrive).all()
    if not table.split:
        assert not fused.any()
    for t, s in zip(*np.nonzero(fused & (table.op == BWD)), strict=True):
        u = t + 1 + np.flatnonzero(table.busy[t + 1 :, s])[0]  # the stage's next op
        assert table.op[u, s] == WGT and fused[u, s]
        assert (table.micro[u, s], table.repeat[u, s]) == (table.micro[t, s], table.repeat[t, s])
        assert not crossing[t:u].any()
    assert (fused & (table.op == BWD)).sum() == (fused & (table.op == WGT)).sum()
    joined = (fused & (table.op == BWD)).sum()  # none, or at least a stage's worth of pairs
    assert joined == 0 or joined * table.num_stages >= (table.op == BWD).sum()
    if args[:3] == ("zb_h1", 4, 8):  # one pair could fuse; alone it is not worth a conditional
        assert not fused.any()
    if args[:3] == ("zb_h1", 2, 4):  # every pair of the first stage, none of the last (its
        # B sends to the first)
        assert (fused & (table.op == BWD)).sum(axis=0).tolist() == [4, 0]


def test_simulation_unit_costs_match_ticks():
    table = full_table("interleaved_1f1b", 4, 8, 2)
    sim = simulate(table, np.ones(8), np.ones(8))
    assert sim.step_time == table.num_ticks
    assert sim.bubble_fraction == pytest.approx(table.bubble_fraction())


def test_simulation_gpipe_closed_form_and_slow_stage():
    S, M = 4, 6
    sim = simulate(full_table("gpipe", S, M), 1.0, 2.0)
    assert sim.step_time == pytest.approx((M + S - 1) * 3.0)
    slow = simulate(full_table("1f1b", S, M), [1.0, 1.0, 3.0, 1.0])
    # The slow stage is the bottleneck: it is never idle between its first and last op, and
    # the other stages wait on it.
    assert slow.step_time >= M * 9.0
    assert slow.idle_S[2] < slow.idle_S[[0, 1, 3]].min()
    # Links add 2 (S - 1) hops to GPipe's critical path; 1F1B's round trips cost at least that.
    gpipe_linked = simulate(full_table("gpipe", S, M), 1.0, 2.0, link_time=0.5)
    assert gpipe_linked.step_time == pytest.approx((S - 1) * (3.0 + 1.0) + M * 3.0)
    unlinked = simulate(full_table("1f1b", S, M), 1.0, 2.0).step_time
    assert unlinked == pytest.approx((M + S - 1) * 3.0)
    assert simulate(full_table("1f1b", S, M), 1.0, 2.0, link_time=0.5).step_time >= unlinked + 3.0


def test_charts(tmp_path):
    table = full_table("1f1b", 3, 4)
    png = tmp_path / "g.png"
    viz.gantt_png(table, str(png), sim=simulate(table, 1.0))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = viz.chrome_trace(table, str(tmp_path / "t.json"))
    spans = [
        e for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"] if e["ph"] == "X"
    ]
    assert len(spans) == 2 * 3 * 4 == int(table.busy.sum())
    assert {e["cat"] for e in spans} == {"forward", "backward"}
    assert trace["traceEvents"][0]["args"]["name"] == "stage 0"
    text = viz.ascii_chart(table)
    assert text.splitlines()[2].startswith("stage 2:") and "B3" in text


def test_cli(tmp_path, capsys):
    viz.main(
        [
            "--schedule",
            "interleaved_1f1b",
            "--stages",
            "2",
            "--microbatches",
            "4",
            "--repeats",
            "2",
            "--ascii",
            "--png",
            str(tmp_path / "a.png"),
            "--trace",
            str(tmp_path / "a.json"),
        ]
    )
    out = capsys.readouterr().out
    assert f"bubble={1 / 9:.4f}" in out and "stage 1:" in out
    assert (tmp_path / "a.png").stat().st_size > 1000
    assert json.loads((tmp_path / "a.json").read_text())["traceEvents"]


def test_ring_tables_run_overlapped_sends_and_full_tables_the_rest():
    table = ring_table("circular", 3, 3, 2, hop=2)
    built = build_table("circular", 3, 3, 2, hop=2)
    assert table.op.max() == FWD and not built.explicit_backward
    assert built.num_ticks == table.num_ticks
    full = build_table("circular", 3, 3, 2)
    assert full.explicit_backward and (full.op == BWD).sum() == (full.op == FWD).sum() == 18


@pytest.mark.parametrize("S", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_zero_bubble_tables_match_the_paper(S, k):
    """Unit times T_F = T_B = T_W (one tick each; a fused backward is B + W, two units).

    1F1B idles 3 (S - 1) units per stage; ZB-H1 idles S - 1 (a third) at 1F1B's peak stash;
    ZB-V (half stages, so 6 M + ... half-units) idles at most S half-units at the same memory.
    """
    M = k * S
    onef1b, zb = full_table("1f1b", S, M), full_table("zb_h1", S, M)
    zbv = full_table("zbv", S, M, 2)
    assert not onef1b.split and zb.split and zbv.split
    assert onef1b.bubble_fraction() == pytest.approx((S - 1) / (M + S - 1), abs=1e-12)
    assert zb.num_ticks == 3 * M + S - 1
    np.testing.assert_array_equal((~zb.busy).sum(axis=0), S - 1)
    assert zb.bubble_fraction() == pytest.approx((S - 1) / (3 * M + S - 1), abs=1e-12)
    assert in_flight(zb).max() == in_flight(onef1b).max() == S
    assert 6 * M + 1 <= zbv.num_ticks <= 6 * M + S
    assert in_flight(zbv).max() == 2 * S
    # Device d holds virtual stages d and 2S - 1 - d; the last forward runs on device 0.
    assert [zbv.device_of(v)[0] for v in (0, S - 1, S, 2 * S - 1)] == [0, S - 1, S - 1, 0]
    last = np.argwhere((zbv.op == FWD) & (zbv.repeat == 1))
    assert set(last[:, 1]) == set(range(S))


def test_validator_checks_w_ops():
    table = full_table("zb_h1", 3, 3)
    t, s = map(int, np.argwhere(table.op == WGT)[0])
    gone = ScheduleTable(table.name, 3, 3, 1, table.op.copy(), table.micro, table.repeat)
    gone.op[t, s] = IDLE
    with pytest.raises(ConfigError, match="never runs W"):
        validate(gone)
    early = ScheduleTable(
        table.name, 3, 3, 1, table.op.copy(), table.micro.copy(), table.repeat.copy()
    )
    early.op[0, 2], early.micro[0, 2], early.repeat[0, 2] = WGT, 0, 0
    early.op[t, s] = IDLE if (t, s) != (0, 2) else WGT
    with pytest.raises(ConfigError, match=r"tick 0, stage 2[\s\S]*runs (before B|twice)"):
        validate(early)
    with pytest.raises(ConfigError, match="num_repeats=2"):
        full_table("zbv", 3, 3, 1)


def test_zero_bubble_simulation():
    """Unit costs reproduce the ticks; a W on a slow stage still fills the bubbles."""
    table = full_table("zb_h1", 4, 8)
    assert simulate(table, 1.0).step_time == table.num_ticks
    fused = simulate(full_table("1f1b", 4, 8), 1.0, 2.0).step_time
    assert simulate(table, 1.0, 1.0, wgt_time=1.0).step_time / fused == pytest.approx(27 / 33)
    zbv = simulate(full_table("zbv", 4, 8, 2), 0.5, 0.5, wgt_time=0.5, link_time=0.05)
    assert zbv.step_time < 0.85 * simulate(full_table("1f1b", 4, 8), 1.0, 2.0, 0.05).step_time


def test_charts_draw_w_ops(tmp_path):
    table = full_table("zb_h1", 2, 2)
    assert "W1" in viz.ascii_chart(table) and "weight gradients" in viz.ascii_chart(table)
    trace = viz.chrome_trace(table, str(tmp_path / "t.json"))
    cats = {e["cat"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert cats == {"forward", "input gradient", "weight gradients"}


@pytest.mark.parametrize("S,M,R", [(2, 3, 1), (3, 2, 2), (4, 8, 3), (3, 7, 2)])
def test_hop_two_ring_tables_and_their_errors(S, M, R):
    """With overlapped sends stage s runs what stage s - 1 ran two ticks before: S - 1 more
    ticks than hop 1, a larger bubble, the same work, and 1F1B schedules refuse it."""
    name = "gpipe" if R == 1 else "circular"
    one, two = ring_table(name, S, M, R), ring_table(name, S, M, R, hop=2)
    assert two.hop == 2 and int(two.busy.sum()) == int(one.busy.sum()) == S * M * R
    period = max(M, 2 * S) if R > 1 else M
    assert two.num_ticks == R * period + 2 * (S - 1)
    assert two.bubble_fraction() > one.bubble_fraction()
    for t, s in zip(*np.nonzero(two.busy[:, 1:]), strict=True):
        assert (two.micro[t - 2, s], two.repeat[t - 2, s]) == (two.micro[t, s + 1],
                                                               two.repeat[t, s + 1])
    broken = ScheduleTable(name, S, M, R, two.op, two.micro, two.repeat, hop=1)
    if S > 1:
        with pytest.raises(ConfigError, match="previous stage sent"):
            validate_ring(broken)
    with pytest.raises(ConfigError, match="sends within the tick"):
        build_table("1f1b", S, M, 1, hop=2)
    with pytest.raises(ConfigError, match="overlap_sends runs with schedule 'gpipe'"):
        PipelineConfig(S, M, schedule="1f1b", overlap_sends=True)
    with pytest.raises(ConfigError, match="overlap_sends must be True or False"):
        PipelineConfig(S, M, overlap_sends="yes")
