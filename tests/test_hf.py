"""Hugging Face checkpoint import / export: logits against Transformers, under pipeline shapes."""

import functools
import json
import os

import jax
import numpy as np
import pytest

from jaxpipe import hf
from jaxpipe import model as M
from jaxpipe.config import PRESETS, ConfigError, PipelineConfig
from jaxpipe.mesh import make_mesh
from jaxpipe.pipeline import Pipeline

TOL = 1e-4
TOKENS_BT = np.random.default_rng(0).integers(0, 96, size=(4, 12)).astype(np.int32)
SHAPES = [  # (stages, micro-batches, repeats, schedule)
    (1, 1, 1, "gpipe"),
    (2, 2, 1, "gpipe"),
    (4, 4, 2, "circular"),
]


@functools.partial(jax.jit, static_argnums=0)
def reference_logits(cfg, params, tokens_BT):
    x_BTD = M.embed_apply(cfg, params, tokens_BT)
    return M.head_apply(cfg, params, M.stack_forward(cfg, params["blocks"], x_BTD))


def random_params(cfg, seed=0):
    """Canonical-shaped float32 params without compiling `init_params` (keeps the suite fast)."""
    rng = np.random.default_rng(seed)
    shapes = M.abstract_params(cfg)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------------------------
# Without torch: config mapping, file layout, errors.


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_config_round_trip(preset):
    cfg = PRESETS[preset].replace(norm_eps=1e-6, tie_embeddings=preset == "tiny")
    if cfg.style == "llama":
        cfg = cfg.replace(rope_theta=5e5)
    back = hf.config_from_hf(hf.config_to_hf(cfg))
    assert back.replace(name=cfg.name) == cfg.replace(tie_embeddings=cfg.tied, d_ff=cfg.ff_dim)


@pytest.mark.parametrize(
    "kind, field, value",
    [
        ("gpt2", "activation_function", "relu"),
        ("gpt2", "scale_attn_by_inverse_layer_idx", True),
        ("llama", "rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("llama", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
        ("llama", "attention_bias", True),
        ("llama", "mlp_bias", True),
        ("llama", "hidden_act", "gelu"),
        ("llama", "head_dim", 16),
    ],
)
def test_unsupported_field_is_named(kind, field, value):
    cfg_hf = hf.config_to_hf(PRESETS["tiny" if kind == "gpt2" else "tiny-llama"])
    with pytest.raises(ConfigError, match=field):
        hf.config_from_hf({**cfg_hf, field: value})


def test_unknown_model_type_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="model_type 'bert'"):
        hf.config_from_hf({"model_type": "bert"})
    with pytest.raises(ConfigError, match="no config.json"):
        hf.load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(PRESETS["tiny"])))
    with pytest.raises(ConfigError, match="no model.safetensors"):
        hf.load_hf(str(tmp_path))
    with pytest.raises(ConfigError, match="lacks the field 'n_embd'"):
        hf.config_from_hf({"model_type": "gpt2", "n_layer": 2, "vocab_size": 8, "n_head": 2})
    with pytest.raises(ConfigError, match="grouped-query"):
        hf.config_to_hf(PRESETS["tiny"].replace(num_kv_heads=2))


@pytest.mark.parametrize(
    "preset, tied, shard_bytes",
    [("tiny", None, 10**9), ("tiny", False, 20_000), ("tiny-llama", None, 20_000)],
)
def test_save_load_round_trip(tmp_path, preset, tied, shard_bytes):
    cfg = PRESETS[preset].replace(tie_embeddings=tied)
    params = random_params(cfg)
    files = hf.save_hf(cfg, params, str(tmp_path), max_shard_bytes=shard_bytes)
    sharded = shard_bytes < 10**9
    assert (hf.INDEX_NAME in files) == sharded and (len(files) > 3) == sharded
    cfg2, params2 = hf.load_hf(str(tmp_path))
    assert cfg2.replace(name=cfg.name) == cfg.replace(tie_embeddings=cfg.tied, d_ff=cfg.ff_dim)
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    # Writing the other layout into the same directory removes the stale files.
    hf.save_hf(cfg, params, str(tmp_path), max_shard_bytes=10**9 if sharded else 20_000)
    names = set(os.listdir(tmp_path))
    assert (hf.INDEX_NAME in names) != sharded and (hf.WEIGHTS_NAME in names) == sharded


def test_shape_mismatch_and_stray_tensors(tmp_path):
    cfg = PRESETS["tiny-llama"]
    hf.save_hf(cfg, random_params(cfg), str(tmp_path))
    cfg_hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg_hf, "intermediate_size": 96}))
    with pytest.raises(ConfigError, match=r"mlp\.gate_proj\.weight.*shape \(64, 32\).*\(96, 32\)"):
        hf.load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg_hf, "num_hidden_layers": 3}))
    with pytest.raises(ConfigError, match=r"no place for.*model\.layers\.3\."):
        hf.load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg_hf, "num_hidden_layers": 5}))
    with pytest.raises(ConfigError, match=r"no tensor 'model\.layers\.4\."):
        hf.load_hf(str(tmp_path))
    # Params in a pipeline view ([S, R, J, ...] blocks) are refused, not written scrambled.
    params = random_params(cfg)
    viewed = {
        **params,
        "blocks": jax.tree.map(lambda a: a.reshape(2, 2, *a.shape[1:]), params["blocks"]),
    }
    with pytest.raises(ConfigError, match="canonical params"):
        hf.save_hf(cfg, viewed, str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------
# Against Transformers.


def _hf_logits(hf_model, tokens_BT):
    import torch

    with torch.no_grad():
        return hf_model(torch.as_tensor(tokens_BT, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Small random Transformers models saved to disk, with their logits on TOKENS_BT."""
    tr = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    common = dict(vocab_size=96, initializer_range=0.1, attn_implementation="eager")
    models = {
        "gpt2": tr.GPT2LMHeadModel(
            tr.GPT2Config(n_layer=8, n_embd=32, n_head=4, n_positions=16, **common)
        ),
        "llama": tr.LlamaForCausalLM(
            tr.LlamaConfig(
                num_hidden_layers=8,
                hidden_size=32,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=48,
                max_position_embeddings=16,
                rms_norm_eps=1e-5,
                rope_theta=500000.0,
                **common,
            )
        ),
        "llama-tied": tr.LlamaForCausalLM(
            tr.LlamaConfig(
                num_hidden_layers=2,
                hidden_size=32,
                num_attention_heads=4,
                num_key_value_heads=1,
                intermediate_size=48,
                max_position_embeddings=16,
                tie_word_embeddings=True,
                **common,
            )
        ),
    }
    out = {}
    for name, m in models.items():
        path = str(tmp_path_factory.mktemp(name))
        m.eval().save_pretrained(path)
        out[name] = (path, _hf_logits(m, TOKENS_BT))
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama-tied"])
def test_reference_logits_match_transformers(checkpoints, name):
    path, want = checkpoints[name]
    cfg, params = hf.load_hf(path)
    assert cfg.tied == (name != "llama")
    if name == "llama":
        assert (cfg.kv_heads, cfg.rope_theta, cfg.norm_eps) == (2, 500000.0, 1e-5)
    got = reference_logits(cfg, params, TOKENS_BT)
    assert got.shape == want.shape
    assert max_diff(got, want) < TOL
    # The comparison can fail: two swapped layers give clearly different logits.
    swapped = jax.tree.map(lambda a: a[np.r_[1, 0, 2 : a.shape[0]]], params["blocks"])
    assert max_diff(reference_logits(cfg, {**params, "blocks": swapped}, TOKENS_BT), want) > 1e-2


def test_original_gpt2_names(checkpoints, tmp_path):
    """OpenAI-era GPT-2 files: no "transformer." prefix, plus attention-mask buffers."""
    from safetensors.numpy import load_file, save_file

    path, want = checkpoints["gpt2"]
    tensors = load_file(os.path.join(path, hf.WEIGHTS_NAME))
    old = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    old["h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
    save_file(old, str(tmp_path / hf.WEIGHTS_NAME), metadata={"format": "pt"})
    (tmp_path / hf.CONFIG_NAME).write_text(open(os.path.join(path, hf.CONFIG_NAME)).read())
    cfg, params = hf.load_hf(str(tmp_path))
    assert max_diff(reference_logits(cfg, params, TOKENS_BT), want) < TOL


@pytest.mark.parametrize("stages, micro, repeats, schedule", SHAPES)
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_pipelined_logits_match_transformers(checkpoints, name, stages, micro, repeats, schedule):
    path, want = checkpoints[name]
    cfg, params = hf.load_hf(path)
    pcfg = PipelineConfig(
        num_stages=stages, num_microbatches=micro, num_repeats=repeats, schedule=schedule
    )
    pipe = Pipeline.create(cfg, pcfg, make_mesh(pcfg, jax.devices()[:stages]))
    got = jax.jit(pipe.logits)(pipe.place(params), TOKENS_BT)
    assert max_diff(got, want) < TOL


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_export_loads_in_transformers(checkpoints, name, tmp_path):
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    path, want = checkpoints[name]
    cfg, params = hf.load_hf(path)
    orig = load_file(os.path.join(path, hf.WEIGHTS_NAME))
    base = json.loads(open(os.path.join(path, hf.CONFIG_NAME)).read())
    for shard_bytes, out in [(10**9, tmp_path / "one"), (30_000, tmp_path / "sharded")]:
        files = hf.save_hf(cfg, params, str(out), max_shard_bytes=shard_bytes, base_config=base)
        if shard_bytes < 10**9:
            assert files[1] == hf.INDEX_NAME and len(files) > 3
            index = json.loads((out / hf.INDEX_NAME).read_text())
            assert set(index["weight_map"].values()) == set(files[2:])
            assert set(index["weight_map"]) == set(orig)
        else:  # same tensor names and values as the file Transformers wrote
            written = load_file(str(out / hf.WEIGHTS_NAME))
            assert set(written) == set(orig)
            for k in orig:
                np.testing.assert_array_equal(written[k], orig[k], err_msg=k)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(out), dtype=torch.float32, attn_implementation="eager"
        ).eval()
        assert max_diff(_hf_logits(loaded, TOKENS_BT), want) < 1e-6
        cfg2, params2 = hf.load_hf(str(out))
        jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_load_transformers_sharded_and_bf16(checkpoints, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    path, want = checkpoints["llama"]
    m = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    m.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / hf.INDEX_NAME).exists()
    cfg, params = hf.load_hf(str(tmp_path / "sharded"))
    assert max_diff(reference_logits(cfg, params, TOKENS_BT), want) < TOL
    # bfloat16 files (numpy has no bfloat16) load as the float32 values of the bf16 weights.
    m.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    _, params16 = hf.load_hf(str(tmp_path / "bf16"))
    q = m.model.layers[3].self_attn.q_proj.weight.float().detach().numpy().T
    q16_LDD, q32_LDD = (
        params16["blocks"]["attn"]["q"]["kernel"],
        params["blocks"]["attn"]["q"]["kernel"],
    )
    np.testing.assert_array_equal(q16_LDD[3], q)
    assert q16_LDD.dtype == np.float32 and 0 < max_diff(q16_LDD, q32_LDD) < 1e-2
