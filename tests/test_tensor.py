"""Tensor parallelism inside stages on a data x pipe x tensor mesh."""

import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpipe import model as M
from jaxpipe import placement
from jaxpipe.config import ConfigError, PipelineConfig, get_preset
from jaxpipe.costmodel import tensor_all_reduces
from jaxpipe.mesh import make_mesh
from jaxpipe.pipeline import Pipeline
from tests.conftest import needs_devices
from tests.test_pipeline import SEQ, _check_against_reference, _tokens

ROOT = Path(__file__).resolve().parents[1]


def _pipe(style, D, S, Tp, Mb=2, R=1, schedule=None, **model_kw):
    preset = "tiny" if style == "gpt2" else "tiny-llama"
    cfg = get_preset(preset, num_layers=S * R, max_seq_len=SEQ, **model_kw)
    pcfg = PipelineConfig(
        num_stages=S,
        num_microbatches=Mb,
        num_repeats=R,
        schedule=schedule or ("gpipe" if R == 1 else "circular"),
        data_parallel=D,
        tensor_parallel=Tp,
    )
    mesh = make_mesh(pcfg, jax.devices()[: D * S * Tp])
    return cfg, Pipeline.create(cfg, pcfg, mesh, poison_bubbles=True)


@needs_devices(8)
@pytest.mark.parametrize(
    "style,R", [("gpt2", 1), pytest.param("llama", 2, marks=pytest.mark.slow)]
)
def test_2x2x2_matches_reference(style, R):
    cfg, pipe = _pipe(style, D=2, S=2, Tp=2, Mb=2, R=R)
    _check_against_reference(cfg, pipe, batch=8)


@pytest.mark.slow
@needs_devices(8)
@pytest.mark.parametrize("style,R", [("llama", 1), ("gpt2", 2)])
def test_2x2x2_matches_reference_other_combinations(style, R):
    cfg, pipe = _pipe(style, D=2, S=2, Tp=2, Mb=2, R=R)
    _check_against_reference(cfg, pipe, batch=8)


@needs_devices(8)
@pytest.mark.parametrize(
    "style,schedule,R",
    [("gpt2", "1f1b", 1), pytest.param("llama", "interleaved_1f1b", 2, marks=pytest.mark.slow)],
)
def test_2x2x2_one_f_one_b_matches_reference(style, schedule, R):
    cfg, pipe = _pipe(style, D=2, S=2, Tp=2, Mb=2, R=R, schedule=schedule)
    _check_against_reference(cfg, pipe, batch=8)


@needs_devices(8)
@pytest.mark.parametrize("D,Tp,schedule", [(8, 1, "gpipe"), (4, 2, "gpipe"), (2, 1, "1f1b")])
def test_one_stage_data_parallel_matches_reference(D, Tp, schedule):
    """One stage with the batch split over `data` (plain data parallelism): the input's gradient
    over a size-1 `pipe` axis once broke XLA's partitioner."""
    cfg, pipe = _pipe("gpt2", D=D, S=1, Tp=Tp, Mb=1, schedule=schedule)
    _check_against_reference(cfg, pipe, batch=8)


def test_placement_rules():
    cfg = get_preset("tiny-llama", num_layers=2)
    specs = placement.param_specs(M.abstract_params(cfg), stack_spec=(None,))
    b = specs["blocks"]
    assert b["attn"]["q"]["kernel"] == P(None, None, "tensor")  # column split
    assert b["attn"]["k"]["kernel"] == P(None, None, "tensor")
    assert b["attn"]["o"]["kernel"] == P(None, "tensor", None)  # row split
    assert b["mlp"]["gate"]["kernel"] == P(None, None, "tensor")
    assert b["mlp"]["down"]["kernel"] == P(None, "tensor", None)
    assert b["attn_norm"]["scale"] == P(None, None)
    assert specs["embed"]["tok"] == P("tensor", None)  # vocabulary-parallel
    assert specs["head"]["out"]["kernel"] == P(None, "tensor")
    gpt = M.abstract_params(get_preset("tiny", num_layers=2))["blocks"]
    gpt = placement.block_specs(gpt, stack_spec=("pipe",))
    assert gpt["attn"]["q"]["bias"] == P("pipe", "tensor")
    assert gpt["mlp"]["down"]["bias"] == P("pipe", None)
    with pytest.raises(ValueError, match="stack dims"):
        placement.block_specs({"attn": {"q": {"bias": np.zeros((2, 3))}}})


@needs_devices(8)
def test_placed_params_are_split_over_tensor():
    cfg, pipe = _pipe("gpt2", D=2, S=2, Tp=2)
    placed = pipe.place(M.init_params(cfg))
    up = placed["blocks"]["mlp"]["up"]["kernel"]  # [S, R, J, D, F]
    assert up.addressable_shards[0].data.shape == (1, 1, 1, cfg.d_model, cfg.ff_dim // 2)
    o = placed["blocks"]["attn"]["o"]["kernel"]
    assert o.addressable_shards[0].data.shape == (1, 1, 1, cfg.d_model // 2, cfg.d_model)


def _tensor_groups(mesh):
    ids = np.vectorize(lambda d: d.id)(mesh.devices)  # [data, pipe, tensor]
    return sorted(tuple(sorted(g)) for g in ids.reshape(-1, ids.shape[-1]).tolist())


@needs_devices(8)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_compiled_matmuls_are_split_and_all_reduced_over_tensor(schedule):
    cfg, pipe = _pipe("gpt2", D=2, S=2, Tp=2, schedule=schedule)
    params = pipe.place(M.init_params(cfg))
    # gpipe: the pipelined forward; 1f1b: its own forward + backward executor.
    fn = pipe.loss if schedule == "gpipe" else pipe.value_and_grad
    hlo = pipe.jit(fn).lower(params, _tokens(8)).compile().as_text()
    # Per stage and micro-batch: 2 rows (8 / 2 micro-batches / 2 data) x 8 tokens = 16 rows.
    rows, D, F = 16, cfg.d_model, cfg.ff_dim
    dots = set(re.findall(r"f32\[(\d+),(\d+)\]\{1,0\} dot\(", hlo))
    assert (str(rows), str(F // 2)) in dots, f"no column-split MLP up matmul in {dots}"
    assert (str(rows), str(F)) not in dots, "MLP up matmul is not split over tensor"
    reduce_groups = re.findall(
        rf"f32\[2,{SEQ},{D}\]\{{2,1,0\}} all-reduce\(.*?replica_groups=(\{{[{{}}0-9,]*\}})", hlo
    )
    assert len(reduce_groups) >= 2, "expected all-reduces after attn o and mlp down"
    groups = sorted(
        tuple(map(int, g.split(","))) for g in re.findall(r"\{([0-9,]+)\}", reduce_groups[0])
    )
    assert groups == _tensor_groups(pipe.mesh)


def _activation_all_reduces(schedule, remat):
    """Activations [rows, SEQ, d_model] all-reduced in the compiled training gradient of one
    block a stage (XLA combines some all-reduces into one of a tuple: each element counts)."""
    cfg = get_preset("tiny", num_layers=2, max_seq_len=SEQ)
    pcfg = PipelineConfig(num_stages=2, num_microbatches=2, schedule=schedule, remat=remat,
                          tensor_parallel=2)
    pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[:4]))
    params = pipe.place(M.init_params(cfg))
    hlo = pipe.jit(pipe.value_and_grad).lower(params, _tokens(8)).compile().as_text()
    results = re.findall(r"= (.*?) all-reduce(?:-start)?\(", hlo)
    return sum(len(re.findall(rf"f32\[\d+,{SEQ},{cfg.d_model}\]", r)) for r in results)


@needs_devices(4)
@pytest.mark.parametrize("schedule", ["gpipe", pytest.param("1f1b", marks=pytest.mark.slow)])
def test_the_planner_counts_the_all_reduces_a_replayed_forward_runs(schedule):
    # remat "layer" replays a block's forward but not its MLP all-reduce, which makes the
    # block's output (saved as the next block's input): one more per block, not two.
    extra = _activation_all_reduces(schedule, "layer") - _activation_all_reduces(schedule, "none")
    assert extra == tensor_all_reduces("layer") - tensor_all_reduces("none") == 1


@needs_devices(8)
def test_clear_tensor_errors():
    cfg = get_preset("tiny-llama", num_layers=2, max_seq_len=SEQ)  # 4 heads, 2 kv heads
    pcfg = PipelineConfig(num_stages=2, tensor_parallel=4)
    pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg))
    with pytest.raises(ConfigError, match=r"must divide num_kv_heads=2.*--tensor_parallel in"):
        pipe.place(M.init_params(cfg))
    with pytest.raises(ConfigError, match="must divide num_heads=4"):
        placement.check_tensor_parallel(get_preset("tiny"), 8)
    with pytest.raises(ConfigError, match=r"2 x 2 x 3 = 12 devices, but 8 are available"):
        make_mesh(PipelineConfig(num_stages=2, data_parallel=2, tensor_parallel=3))


@pytest.mark.slow
def test_train_lm_flags_end_to_end(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "experiments/train_lm.py"),
        "--model=tiny",
        "--num_layers=2",
        "--num_stages=2",
        "--data_parallel=2",
        "--tensor_parallel=2",
        "--num_microbatches=2",
        "--batch_size=4",
        "--seq_len=8",
        "--steps=2",
        "--log_every=1",
        "--warmup_steps=1",
        f"--workdir={tmp_path}",
        f"--data={ROOT / 'jaxpipe'}",
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 2/2" in out.stdout
    assert (tmp_path / "summary.json").exists()
    bad = subprocess.run(
        cmd[:-2] + ["--devices=6", f"--workdir={tmp_path}/bad"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin"},
    )
    assert bad.returncode != 0
    assert "2 x 2 x 2 = 8 devices, but 6 are available" in bad.stderr
