"""Communication charges of the step-time model and FLOP counting by formula."""

import dataclasses

import pytest

from jaxpipe.autotune import _remat_order
from jaxpipe.config import ConfigError, PipelineConfig, get_preset
from jaxpipe.costmodel import CostModel
from jaxpipe.costs import DeviceProfile, LayerCost, ModelCosts, StepFit
from jaxpipe.flops import megatron_eq3, model_flops, training_flops
from jaxpipe.layout import StageLayout
from jaxpipe.links import Links, MeshLinks
from jaxpipe.partition import build_plan
from jaxpipe.schedule import executor_table
from jaxpipe.simulate import simulate

GB = 1e9
LINKS = Links(300 * GB, 25 * GB, 5e-6, 10e-6, devices_per_node=8)
PROFILE = DeviceProfile("test", 1e14, 2e12, 80 * GB, LINKS)
ACT = 64e6  # bytes of one [b, T, D] activation


def _costs():
    layer = LayerCost(1e12, 1e9, 0.0, 1000, 0.0, 0.0, 1e6)
    return ModelCosts(layer, layer, layer, ACT, 1, 2048)


def _cm(**pipe) -> CostModel:
    cfg = get_preset("small")
    return CostModel.from_costs(_costs(), PROFILE, cfg, PipelineConfig(**pipe))


def test_which_axes_cross_nodes():
    assert not MeshLinks(4, 1, 8, 8).tensor_crosses  # tensor 8 fills a node of 8
    assert MeshLinks(1, 1, 16, 8).tensor_crosses
    assert not MeshLinks(1, 2, 4, 8).pipe_crosses  # 4 x 2 = one node
    assert MeshLinks(1, 4, 4, 8).pipe_crosses  # 4 x 4 = two nodes
    assert MeshLinks(1, 3, 2, 8).pipe_crosses  # a ring of 3 x 2 straddles a node boundary
    assert not MeshLinks(2, 2, 2, 8).data_crosses and MeshLinks(2, 2, 4, 8).data_crosses


def test_all_reduce_is_a_ring():
    # 2 (k-1)/k x bytes / bandwidth + 2 (k-1) latencies; nothing for one device.
    assert LINKS.all_reduce_time(ACT, 1, False) == 0
    assert LINKS.all_reduce_time(ACT, 4, False) == pytest.approx(1.5 * ACT / 300e9 + 6 * 5e-6)
    assert LINKS.all_reduce_time(ACT, 4, True) == pytest.approx(1.5 * ACT / 25e9 + 6 * 10e-6)


def test_tensor_all_reduces_grow_with_degree_and_recomputation():
    comm = {t: _cm(tensor_parallel=t).block_comm_time for t in (1, 2, 4, 8)}
    assert comm[1] == 0 and comm[2] < comm[4] < comm[8]
    assert comm[8] == pytest.approx(4 * LINKS.all_reduce_time(ACT, 8, False))
    # remat "layer" replays the forward: its attention all-reduce runs again (the MLP's makes
    # the saved block output), and the compute is 4/3.
    remat = _cm(tensor_parallel=8, remat="layer")
    assert remat.block_comm_time == pytest.approx(1.25 * comm[8])
    # remat "stage" replays both: the stage's blocks make each other's inputs.
    staged = _cm(tensor_parallel=8, remat="stage", num_stages=2).block_comm_time
    assert staged == pytest.approx(1.5 * comm[8])
    plain = _cm(tensor_parallel=8)
    assert remat.block_time - remat.block_comm_time == pytest.approx(
        4 / 3 * (plain.block_time - plain.block_comm_time)
    )
    # Past a node, the same all-reduces run over the network, about 12x slower here.
    assert _cm(tensor_parallel=16).block_comm_time > 10 * comm[8]


def test_stage_sends_use_the_network_once_tensor_x_pipe_exceeds_a_node():
    assert _cm(num_stages=1).transfer_time == 0
    inside = _cm(num_stages=2, tensor_parallel=4).transfer_time
    across = _cm(num_stages=4, tensor_parallel=4).transfer_time
    assert inside == pytest.approx(2 * (5e-6 + ACT / 4 / 300e9))  # each rank sends its 1/t
    assert across == pytest.approx(2 * (10e-6 + ACT / 4 / 25e9))


def test_a_measured_all_reduce_replaces_the_ring_inside_a_node():
    # Forced CPU devices: one rendezvous and copies, whatever the group size; across nodes the
    # ring still applies. The data-parallel gradient reduction reads the same figures.
    shared = LINKS.replace(reduce_bandwidth=2 * GB, reduce_latency=1e-4)
    for group in (2, 4, 8):
        assert shared.all_reduce_time(ACT, group, False) == pytest.approx(1e-4 + ACT / 2e9)
    assert shared.all_reduce_time(ACT, 1, False) == 0
    assert shared.all_reduce_time(ACT, 4, True) == LINKS.all_reduce_time(ACT, 4, True)
    with pytest.raises(ConfigError, match="together"):
        LINKS.replace(reduce_latency=1e-4)
    with pytest.raises(ConfigError, match="reduce_bandwidth > 0"):
        LINKS.replace(reduce_bandwidth=0.0, reduce_latency=1e-4)
    cfg = get_preset("small")
    pcfg = PipelineConfig(2, 4, data_parallel=2)
    cm = CostModel.from_costs(_costs(), DeviceProfile("test", 1e14, 2e12, 80 * GB, shared), cfg,
                              pcfg)
    assert cm.grad_reduce_time(1000) == pytest.approx(1e-4 + 4 * 1000 / 2e9)


def test_data_parallel_gradient_reduction_is_charged_once_per_step():
    cfg = get_preset("small")
    layout = StageLayout.uniform(cfg.num_layers, 2)
    plans = {}
    for d in (1, 8):
        pcfg = PipelineConfig(2, 4, data_parallel=d, tensor_parallel=4)
        cm = CostModel.from_costs(_costs(), PROFILE, cfg, pcfg)
        plans[d] = build_plan(cfg, pcfg, layout, cm, "uniform", "test")
    assert plans[1].grad_reduce_s == 0
    params = max(st.params for st in plans[8].stages)
    # data groups of 8 span 8 nodes (tensor 4 x pipe 2 fill one): the network, fp32 gradients.
    expected = 2 * 7 / 8 * 4 * params / 25e9 + 14 * 10e-6
    assert plans[8].grad_reduce_s == pytest.approx(expected)
    assert plans[8].step_time_s == pytest.approx(plans[1].step_time_s + expected)


def test_shared_cores_make_a_tick_last_its_ops_total():
    table = executor_table("gpipe", 4, 8)
    alone = simulate(table, 1.0, 2.0, lockstep=True).step_time
    shared = simulate(table, 1.0, 2.0, lockstep=True, concurrency=1).step_time
    assert alone == pytest.approx(11 * 1.0 + 11 * 2.0)  # M + S - 1 ticks each way
    assert shared == pytest.approx(4 * 8 * 3.0)  # every op of every stage, one after another
    assert simulate(table, 1.0, 2.0, lockstep=True, concurrency=4).step_time == alone
    # Data and tensor replicas of a stage share the same cores too.
    shared_cpu = DeviceProfile("cpu", 1e11, 1e10, 8 * GB, LINKS, concurrency=2)
    pcfg = PipelineConfig(2, 4, data_parallel=2, tensor_parallel=2)
    cm = CostModel.from_costs(_costs(), shared_cpu, get_preset("small"), pcfg)
    assert cm.concurrency == 0.5


def test_formula_flops_are_megatrons_eq3():
    gpt3 = get_preset("gpt3-175b").replace(vocab_size=51200)
    B, s = 1536, 2048
    eq3 = megatron_eq3(B, s, 96, 12288, 51200)
    assert training_flops(gpt3, B, s) == pytest.approx(eq3, rel=1e-12)
    no_recompute = 72 * B * s * 96 * 12288**2 * (1 + s / (6 * 12288) + 51200 / (12 * 96 * 12288))
    assert model_flops(gpt3, B, s) == pytest.approx(no_recompute, rel=1e-12)
    # About 4.4 exaFLOPs per step (6 N tokens = 3.3e18, plus attention and recomputation).
    assert 4.0e18 < eq3 < 4.8e18


def test_a_measured_recompute_cost_replaces_four_thirds_and_orders_the_remat_search():
    def block_time(profile, remat):
        cm = CostModel.from_costs(_costs(), profile, get_preset("small"),
                                  PipelineConfig(2, 4, remat=remat))
        return cm.block_time

    plain = block_time(PROFILE, "none")
    assert block_time(PROFILE, "layer") == pytest.approx(plain * 4 / 3)
    cheap = DeviceProfile("cpu", 1e14, 2e12, 80 * GB, LINKS, remat_cost=0.9)
    assert block_time(cheap, "layer") == pytest.approx(plain * 0.9)
    assert block_time(cheap, "none") == pytest.approx(plain)
    modes = ("none", "layer", "stage")
    assert _remat_order(modes, PROFILE, 2, False) == ["none", "layer", "stage"]
    assert _remat_order(modes, cheap, 2, False) == ["layer", "stage", "none"]
    # fitted per stage count: cheap on one stage, dear on four and in split tables
    fitted = dataclasses.replace(cheap, fit=StepFit(4, 4, 1.1, 1.2))
    assert _remat_order(modes, fitted, 1, False) == ["layer", "stage", "none"]
    assert _remat_order(modes, fitted, 4, False) == ["none", "layer", "stage"]
    assert block_time(fitted, "layer") == pytest.approx(plain * (0.9 * 1.1) ** 0.5)
    split = CostModel.from_costs(_costs(), fitted, get_preset("small"),
                                 PipelineConfig(2, 4, schedule="zb_h1", remat="layer"))
    assert split.block_time == pytest.approx(plain * 1.2)
    # a split table's measured overhead makes its backward dearer, not its forward
    dear = dataclasses.replace(fitted, fit=dataclasses.replace(fitted.fit, split_cost=1.1))
    for remat, base in (("layer", 1.2), ("none", 1.0)):
        pcfg = PipelineConfig(2, 4, schedule="zb_h1", remat=remat)
        cm = CostModel.from_costs(_costs(), dear, get_preset("small"), pcfg)
        assert cm.block_time == pytest.approx(plain * base * 1.1)
        assert cm.block_time * cm.fwd_share == pytest.approx(plain / 3)
        fused = CostModel.from_costs(_costs(), dear, get_preset("small"),
                                     pcfg.replace(schedule="1f1b"))
        assert fused.block_time == pytest.approx(
            plain * ((0.9 * 1.1) ** 0.5 if remat == "layer" else 1.0))


def test_a_fitted_tensor_factor_scales_the_tensor_parallel_block_and_orders_remat():
    fitted = DeviceProfile("cpu", 1e14, 2e12, 80 * GB, LINKS, remat_cost=1.05,
                           fit=StepFit(4, 4, 1.1, 1.2))
    ranked = dataclasses.replace(
        fitted, fit=dataclasses.replace(fitted.fit, tensor=4, tensor_cost=1.2, remat_tensor=0.8))

    def block(profile, remat, tensor):
        pcfg = PipelineConfig(1, 4, remat=remat, data_parallel=4 // tensor,
                              tensor_parallel=tensor)
        return CostModel.from_costs(_costs(), profile, get_preset("small"), pcfg).block_time

    for remat, factor in (("none", 1.2), ("layer", 1.2 * 0.8), ("stage", 1.2 * 0.8)):
        assert block(ranked, remat, 4) == pytest.approx(block(fitted, remat, 4) * factor)
        # geometric in log(tensor): half the way at two ranks, nothing at one
        assert block(ranked, remat, 2) == pytest.approx(block(fitted, remat, 2) * factor**0.5)
        assert block(ranked, remat, 1) == block(fitted, remat, 1)
    # fitted on one stage, where its references run: pipelined blocks keep the model's figure
    piped = PipelineConfig(2, 4, remat="layer", tensor_parallel=2)
    assert (CostModel.from_costs(_costs(), ranked, get_preset("small"), piped).block_time
            == CostModel.from_costs(_costs(), fitted, get_preset("small"), piped).block_time)
    assert _remat_order(("none", "layer"), ranked, 2, False, tensor=4) == ["none", "layer"]
    # cheaper to recompute on one stage with the tensor factor, not without
    assert _remat_order(("none", "layer"), fitted, 1, False, tensor=4) == ["none", "layer"]
    assert _remat_order(("none", "layer"), ranked, 1, False, tensor=4) == ["layer", "none"]
    assert _remat_order(("none", "layer"), ranked, 1, False, tensor=1) == ["none", "layer"]
