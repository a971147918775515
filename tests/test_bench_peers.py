"""The torch copy of the model behind experiments/bench_peers.py computes what jaxpipe computes.

In-process, on the `tiny` preset: the loss check the benchmark runs before timing, the gradients
(every parameter, by name), and that the check fails on a model that differs. Timing is not
tested here.
"""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from experiments import torch_gpt  # noqa: E402 (needs torch)
from jaxpipe import model as M  # noqa: E402
from jaxpipe.config import ConfigError, get_preset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import bench_peers  # noqa: E402 (a script next to torch_gpt)

CFG = get_preset("tiny", num_layers=2)


@pytest.fixture(scope="module")
def setup():
    params = jax.tree.map(np.asarray, M.init_params(CFG, 3))
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 9), dtype=np.int32)
    return params, tokens


def test_losses_agree(setup):
    params, tokens = setup
    ref, got = torch_gpt.check_loss(CFG, params, tokens, rtol=1e-5)
    assert abs(got - ref) <= 1e-5 * abs(ref)
    assert 4.0 < ref < 7.0  # about ln(256) at initialisation, not a degenerate value


def test_gradients_agree(setup):
    params, tokens = setup
    grads = jax.jit(jax.grad(M.reference_loss, argnums=1), static_argnums=0)(CFG, params, tokens)
    model = torch_gpt.whole_model(CFG, params)
    t = torch.from_numpy(tokens.astype(np.int64))
    torch_gpt.loss_fn(model(t[:, :-1]), t[:, 1:]).backward()
    got = {name: p.grad.numpy() for name, p in model.named_parameters()}
    want = dict(torch_gpt._flat(grads["embed"], "embed."))
    want.update(torch_gpt._flat(grads["head"], "head."))
    for name, g in torch_gpt._flat(grads["blocks"]):
        want.update((f"blocks.{i}.{name}", g[i]) for i in range(CFG.num_layers))
    assert set(got) == set(want)
    # The key biases' gradient is zero in exact arithmetic (softmax ignores a per-query shift);
    # both sides give rounding noise there, so tolerances have a floor below the largest leaf's.
    floor = 1e-3 * max(float(np.abs(g).max()) for g in want.values())
    for name, g in want.items():
        atol = 1e-4 * max(float(np.abs(g).max()), floor)
        np.testing.assert_allclose(got[name], g, atol=atol, rtol=0, err_msg=name)


def test_a_different_model_fails_the_check(setup, monkeypatch):
    params, tokens = setup
    whole = torch_gpt.whole_model

    def shifted(cfg, p):
        model = whole(cfg, p)
        with torch.no_grad():
            model.head.norm.bias += 0.05
        return model

    monkeypatch.setattr(torch_gpt, "whole_model", shifted)
    with pytest.raises(torch_gpt.LossMismatch, match="differs from jaxpipe's reference loss"):
        torch_gpt.check_loss(CFG, params, tokens, rtol=1e-5)


def test_loader_refuses_other_shapes(setup):
    params, _ = setup
    wider = torch_gpt.GPTStage(CFG.replace(d_ff=128), range(2), embed=True, head=False)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.(up|down)\.kernel: jaxpipe shape"):
        torch_gpt.load_params(wider, params)


def test_stage_holds_its_layers(setup):
    """A middle stage of the pipeline gets its layer of the stack, nothing else."""
    params, _ = setup
    stage = torch_gpt.GPTStage(CFG, range(1, 2), embed=False, head=False)
    torch_gpt.load_params(stage, params)
    np.testing.assert_array_equal(
        stage.blocks[0].mlp.up.kernel.detach().numpy(), params["blocks"]["mlp"]["up"]["kernel"][1]
    )
    assert stage.tied_table() is None


def test_other_block_styles_are_refused():
    with pytest.raises(ConfigError, match="gpt2-style blocks"):
        torch_gpt.check_config(get_preset("tiny-llama"))


def test_dense_shapes_are_the_models_matmul_weights():
    """The matmuls `bench_peers.matmul_seconds` times are the model's: one per block kernel
    (by shape, every layer) and the tied head's projection onto the token table."""
    kernels = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(M.abstract_params(CFG))[0]:
        if jax.tree_util.keystr(path).endswith("['kernel']"):
            layers, d_in, d_out = leaf.shape
            kernels[d_in, d_out] = kernels.get((d_in, d_out), 0) + layers
    table = (CFG.d_model, CFG.vocab_size)
    kernels[table] = kernels.get(table, 0) + 1
    assert bench_peers.dense_shapes(CFG) == kernels
