"""Hugging Face GPT-2 / Llama checkpoints (config.json + safetensors) <-> jaxpipe.

`load_hf` reads a local checkpoint directory, single-file (`model.safetensors`) or sharded
(`model.safetensors.index.json` + shards), into a `ModelConfig` and canonical float32 params
(blocks stacked on a leading `layers` axis). `save_hf` writes them back so that Transformers'
`from_pretrained` loads the directory and computes the same logits. Only numpy and the
`safetensors` package are used: torch is not needed.

Weight layouts: GPT-2's Conv1D kernels are already [in, out] and its fused `c_attn` splits into
q, k, v along the output axis; torch `Linear` weights (Llama, `lm_head`) are [out, in] and are
transposed. Both use the half-split (rotate_half) RoPE convention, so no permutation is needed.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import os
import re

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jaxpipe.config import ConfigError, ModelConfig
from jaxpipe.model import abstract_params

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Buffers some checkpoints carry that are not parameters.
_IGNORED_RE = re.compile(r".*(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")
_GPT2_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh-approximated GELU

# Per-layer tensors: (Hugging Face name after the layer prefix, jaxpipe path, transpose?).
# GPT-2's fused c_attn appears here as three virtual names `.q`, `.k`, `.v` (see _split_qkv).
_GPT2_LAYER = [
    ("ln_1.weight", ("attn_norm", "scale"), False),
    ("ln_1.bias", ("attn_norm", "bias"), False),
    *[(f"attn.c_attn.weight.{n}", ("attn", n, "kernel"), False) for n in "qkv"],
    *[(f"attn.c_attn.bias.{n}", ("attn", n, "bias"), False) for n in "qkv"],
    ("attn.c_proj.weight", ("attn", "o", "kernel"), False),
    ("attn.c_proj.bias", ("attn", "o", "bias"), False),
    ("ln_2.weight", ("mlp_norm", "scale"), False),
    ("ln_2.bias", ("mlp_norm", "bias"), False),
    ("mlp.c_fc.weight", ("mlp", "up", "kernel"), False),
    ("mlp.c_fc.bias", ("mlp", "up", "bias"), False),
    ("mlp.c_proj.weight", ("mlp", "down", "kernel"), False),
    ("mlp.c_proj.bias", ("mlp", "down", "bias"), False),
]
_LLAMA_LAYER = [
    ("input_layernorm.weight", ("attn_norm", "scale"), False),
    *[(f"self_attn.{n}_proj.weight", ("attn", n, "kernel"), True) for n in "qkvo"],
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), False),
    *[(f"mlp.{n}_proj.weight", ("mlp", n, "kernel"), True) for n in ("gate", "up", "down")],
]


def _names(cfg: ModelConfig):
    """(global tensors, layer prefix, per-layer tensors) in Hugging Face naming."""
    if cfg.style == "gpt2":
        glob = [
            ("transformer.wte.weight", ("embed", "tok"), False),
            ("transformer.wpe.weight", ("embed", "pos"), False),
            ("transformer.ln_f.weight", ("head", "norm", "scale"), False),
            ("transformer.ln_f.bias", ("head", "norm", "bias"), False),
        ]
        prefix, layer = "transformer.h.{}.", _GPT2_LAYER
    else:
        glob = [
            ("model.embed_tokens.weight", ("embed", "tok"), False),
            ("model.norm.weight", ("head", "norm", "scale"), False),
        ]
        prefix, layer = "model.layers.{}.", _LLAMA_LAYER
    if not cfg.tied:
        glob.append(("lm_head.weight", ("head", "out", "kernel"), True))
    return glob, prefix, layer


# ---------------------------------------------------------------------------------------------
# config.json


def _reject(hf: dict, field: str, ok) -> None:
    if field in hf and not ok(hf[field]):
        raise ConfigError(
            f"config.json field {field}={hf[field]!r} is not supported by jaxpipe's "
            f"{hf['model_type']} blocks; convert a checkpoint without it"
        )


def config_from_hf(hf: dict) -> ModelConfig:
    """A `ModelConfig` from a Hugging Face config.json dict; raises ConfigError naming the field."""
    if not isinstance(hf, dict):
        raise ConfigError(
            f"config.json holds a JSON {type(hf).__name__}, not an object of model settings"
        )
    try:
        return _config_from_hf(hf)
    except KeyError as e:
        raise ConfigError(
            f"config.json lacks the field {e.args[0]!r} that model_type {hf.get('model_type')!r} "
            f"needs"
        ) from None
    except (TypeError, AttributeError) as e:  # a field of the wrong JSON type
        raise ConfigError(f"config.json has a field of an unexpected type ({e})") from None


def _int(hf: dict, field: str, default=None):
    """An integer field (absent: `default`); ConfigError naming the field otherwise."""
    value = hf[field] if default is None else hf.get(field, default)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config.json field {field}={value!r} must be a positive integer")
    return value


def _bool(hf: dict, field: str, default: bool) -> bool:
    value = hf.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"config.json field {field}={value!r} must be true or false")
    return value


def _float(hf: dict, field: str, default: float) -> float:
    value = hf.get(field, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"config.json field {field}={value!r} must be a finite number > 0")
    return float(value)


def _config_from_hf(hf: dict) -> ModelConfig:
    kind = hf.get("model_type")
    if kind == "gpt2":
        _reject(hf, "activation_function", lambda v: v in _GPT2_ACTS)
        _reject(hf, "scale_attn_weights", lambda v: v is True)
        _reject(hf, "scale_attn_by_inverse_layer_idx", lambda v: not v)
        _reject(hf, "add_cross_attention", lambda v: not v)
        d = _int(hf, "n_embd")
        return ModelConfig(
            name=str(hf.get("_name_or_path") or "gpt2"),
            style="gpt2",
            vocab_size=_int(hf, "vocab_size"),
            num_layers=_int(hf, "n_layer"),
            d_model=d,
            num_heads=_int(hf, "n_head"),
            d_ff=_int(hf, "n_inner", 4 * d),
            max_seq_len=_int(hf, "n_positions", _int(hf, "n_ctx", 1024)),
            tie_embeddings=_bool(hf, "tie_word_embeddings", True),
            norm_eps=_float(hf, "layer_norm_epsilon", 1e-5),
        )
    if kind == "llama":
        d, heads = _int(hf, "hidden_size"), _int(hf, "num_attention_heads")
        _reject(hf, "hidden_act", lambda v: v == "silu")
        _reject(hf, "attention_bias", lambda v: not v)
        _reject(hf, "mlp_bias", lambda v: not v)
        plain_rope = lambda v: not v or v.get("rope_type", v.get("type", "default")) == "default"
        _reject(hf, "rope_scaling", plain_rope)
        _reject(hf, "rope_parameters", plain_rope)
        _reject(hf, "head_dim", lambda v: v is None or v * heads == d)
        theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
        return ModelConfig(
            name=str(hf.get("_name_or_path") or "llama"),
            style="llama",
            vocab_size=_int(hf, "vocab_size"),
            num_layers=_int(hf, "num_hidden_layers"),
            d_model=d,
            num_heads=heads,
            num_kv_heads=_int(hf, "num_key_value_heads", heads),
            d_ff=_int(hf, "intermediate_size"),
            max_seq_len=_int(hf, "max_position_embeddings", 2048),
            tie_embeddings=_bool(hf, "tie_word_embeddings", False),
            rope_theta=_float({"rope_theta": theta}, "rope_theta", 10000.0),
            norm_eps=_float(hf, "rms_norm_eps", 1e-6),
        )
    raise ConfigError(
        f"config.json model_type {kind!r} is not supported; jaxpipe.hf reads 'gpt2' and 'llama'"
    )


def config_to_hf(cfg: ModelConfig, base: dict | None = None) -> dict:
    """A Hugging Face config.json dict for `cfg`; keys of `base` not set here are kept."""
    out = {}
    if cfg.style == "gpt2":
        if cfg.kv_heads != cfg.num_heads:
            raise ConfigError(
                f"Hugging Face GPT-2 has no grouped-query attention (num_kv_heads "
                f"{cfg.kv_heads} != num_heads {cfg.num_heads}); use num_kv_heads=None"
            )
        out.update(
            architectures=["GPT2LMHeadModel"],
            model_type="gpt2",
            vocab_size=cfg.vocab_size,
            n_layer=cfg.num_layers,
            n_embd=cfg.d_model,
            n_head=cfg.num_heads,
            n_inner=cfg.ff_dim,
            n_positions=cfg.max_seq_len,
            activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps,
            scale_attn_weights=True,
        )
    else:
        out.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            vocab_size=cfg.vocab_size,
            num_hidden_layers=cfg.num_layers,
            hidden_size=cfg.d_model,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_dim,
            intermediate_size=cfg.ff_dim,
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,  # read by Transformers 4.x
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},  # 5.x
            rope_scaling=None,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
        )
    out.update(tie_word_embeddings=cfg.tied, dtype="float32", torch_dtype="float32")
    if base and base.get("model_type", out["model_type"]) != out["model_type"]:
        raise ConfigError(
            f"base config is for model_type {base['model_type']!r}, the params are "
            f"{out['model_type']!r}"
        )
    return {**(base or {}), **out}


# ---------------------------------------------------------------------------------------------
# tensors <-> params


def _split_qkv(tensors: dict, cfg: ModelConfig) -> dict:
    """GPT-2's fused c_attn [D, 3D] / [3D] -> virtual `.q/.k/.v` tensors."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
            if t.shape[-1] != 3 * cfg.d_model:
                want = 3 * cfg.d_model
                raise ConfigError(f"{name} has shape {t.shape}; config.json implies [..., {want}]")
            for n, part in zip("qkv", np.split(t, 3, axis=-1), strict=True):
                out[f"{name}.{n}"] = part
        else:
            out[name] = t
    return out


def _get(tree, path):
    return functools.reduce(operator.getitem, path, tree)


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def params_from_hf(cfg: ModelConfig, tensors: dict) -> dict:
    """Canonical float32 numpy params from Hugging Face-named tensors; checks names and shapes."""
    shapes = abstract_params(cfg)
    if cfg.style == "gpt2":  # the original GPT-2 files have no "transformer." prefix
        tensors = {
            k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
            for k, v in tensors.items()
        }
        tensors = _split_qkv(tensors, cfg)
    used = set()

    def take(name, path, transpose, layer=None):
        if name not in tensors:
            raise ConfigError(
                f"checkpoint has no tensor {name!r}, which a {cfg.style} model with this "
                f"config.json needs (tie_word_embeddings={cfg.tied})"
            )
        used.add(name)
        t = np.asarray(tensors[name], dtype=np.float32)
        if not np.isfinite(t).all():
            raise ConfigError(
                f"tensor {name!r} holds NaN or infinite values; the checkpoint is corrupt "
                f"(download it again)"
            )
        t = t.T if transpose else t
        want = _get(shapes, path if layer is None else ("blocks", *path)).shape[layer is not None :]
        if t.shape != tuple(want):
            raise ConfigError(
                f"tensor {name!r} has shape {tensors[name].shape} but config.json implies "
                f"{tuple(want)[::-1] if transpose else tuple(want)}; the config and weights "
                f"disagree"
            )
        return t

    glob, prefix, layer = _names(cfg)
    params: dict = {}
    for name, path, tr in glob:
        _set(params, path, take(name, path, tr))
    for suffix, path, tr in layer:
        stack = [take(prefix.format(i) + suffix, path, tr, i) for i in range(cfg.num_layers)]
        _set(params, ("blocks", *path), np.stack(stack))
    skip = lambda k: k in used or _IGNORED_RE.match(k) or (cfg.tied and k == "lm_head.weight")
    extra = sorted(k for k in tensors if not skip(k))
    if extra:
        raise ConfigError(
            f"checkpoint has {len(extra)} tensors jaxpipe's {cfg.style} model has no place for "
            f"(e.g. {extra[:3]}); check config.json (biases, layer count) against the weights"
        )
    return params


def params_to_hf(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
    """Hugging Face-named, contiguous float32 numpy tensors from canonical params."""
    glob, prefix, layer = _names(cfg)
    out = {}
    for name, path, tr in glob:
        t = np.asarray(_get(params, path), dtype=np.float32)
        out[name] = t.T if tr else t
    for suffix, path, tr in layer:
        stack = np.asarray(_get(params["blocks"], path), dtype=np.float32)
        if stack.shape[0] != cfg.num_layers:
            raise ConfigError(
                f"params blocks/{'/'.join(path)} has {stack.shape[0]} layers, the config "
                f"{cfg.num_layers}; pass canonical params (pipeline.to_canonical)"
            )
        for i in range(cfg.num_layers):
            out[prefix.format(i) + suffix] = stack[i].T if tr else stack[i]
    for base in [k[:-2] for k in out if k.endswith(("c_attn.weight.q", "c_attn.bias.q"))]:
        out[base] = np.concatenate([out.pop(f"{base}.{n}") for n in "qkv"], axis=-1)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# files


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # bad JSON or not UTF-8
        raise ConfigError(f"{path} is not valid JSON ({e}); restore the file") from None


def _read_tensors(path: str) -> dict:
    """The tensors of one safetensors file; ConfigError naming the file when it is unreadable."""
    try:
        return _parse_tensors(path)
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is missing; the checkpoint is incomplete (download every shard listed in "
            f"{INDEX_NAME})"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror or e})") from None
    except (SafetensorError, ValueError, KeyError, TypeError, EOFError) as e:
        raise ConfigError(
            f"{path} is not a valid safetensors file ({type(e).__name__}: {e}); it may be "
            f"truncated or corrupt: download it again"
        ) from None


def _parse_tensors(path: str) -> dict:
    try:
        return load_file(path)
    except TypeError:  # numpy has no bfloat16: parse the file, converting via ml_dtypes
        import ml_dtypes

    kinds = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            if info["dtype"] not in kinds:
                raise ConfigError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            a, b = info["data_offsets"]
            arr = np.frombuffer(data[a:b], dtype=kinds[info["dtype"]]).reshape(info["shape"])
            out[name] = arr.astype(np.float32)
    return out


def _shards(path: str, index: str) -> list[str]:
    """The shard files an index names; ConfigError when the index is malformed."""
    weight_map = _read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()
    ):
        raise ConfigError(
            f"{index} has no \"weight_map\" object of tensor name -> shard file; restore the "
            f"file"
        )
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise ConfigError(
                f"{index} names shard {shard!r}, which is not a file name in {path}; shards must "
                f"lie next to the index"
            )
    return shards


def load_hf(path: str) -> tuple[ModelConfig, dict]:
    """Reads a local Hugging Face GPT-2 / Llama checkpoint directory.

    Args:
      path: a directory with config.json and either model.safetensors or
        model.safetensors.index.json plus the shards it names.
    Returns:
      (ModelConfig, canonical float32 params) ready for `Pipeline.place` or `model` functions.
    Raises:
      ConfigError naming the file and what is wrong with it (malformed JSON, an unsupported
      model, a missing, truncated or corrupt safetensors file, non-finite weights, ...).
    """
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"no {CONFIG_NAME} in {path!r}; pass a Hugging Face model directory")
    try:
        cfg = config_from_hf(_read_json(cfg_path))
    except ConfigError as e:
        msg = str(e)
        if msg.startswith(CONFIG_NAME):
            msg = cfg_path + msg[len(CONFIG_NAME) :]
        raise ConfigError(msg if cfg_path in msg else f"{cfg_path}: {msg}") from None
    single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, INDEX_NAME)
    if os.path.isfile(single):
        tensors = _read_tensors(single)
    elif os.path.isfile(index):
        tensors = {}
        for shard in _shards(path, index):
            tensors.update(_read_tensors(os.path.join(path, shard)))
    else:
        raise ConfigError(
            f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path!r}; only safetensors checkpoints are "
            f"read (convert pytorch_model.bin with Transformers' save_pretrained)"
        )
    try:
        return cfg, params_from_hf(cfg, tensors)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_hf(
    cfg: ModelConfig,
    params,
    path: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    base_config: dict | None = None,
) -> list[str]:
    """Writes config.json and float32 safetensors that Transformers' `from_pretrained` loads.

    Args:
      cfg, params: the model and its canonical params (use `Pipeline.to_canonical` on placed ones).
      path: output directory (created; stale weight files of the other layout are removed).
      max_shard_bytes: above this total, tensors go to model-0000k-of-0000n.safetensors shards
        plus model.safetensors.index.json (a tensor larger than the limit gets its own shard).
      base_config: an original config.json dict whose other keys (token ids, ...) are kept.
    Returns:
      The written file names.
    """
    tensors = params_to_hf(cfg, params)
    shards, size = [[]], 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards, size = [*shards, []], 0
        shards[-1].append(name)
        size += t.nbytes
    os.makedirs(path, exist_ok=True)
    for old in os.listdir(path):
        if old in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_RE.fullmatch(old):
            os.remove(os.path.join(path, old))
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config_to_hf(cfg, base_config), f, indent=2, sort_keys=True)
    meta = {"format": "pt"}  # Transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata=meta)
        return [CONFIG_NAME, WEIGHTS_NAME]
    files, weight_map = [], {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, os.path.join(path, fname), metadata=meta)
        weight_map.update(dict.fromkeys(names, fname))
        files.append(fname)
    total = int(sum(t.nbytes for t in tensors.values()))
    with open(os.path.join(path, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return [CONFIG_NAME, INDEX_NAME, *files]
