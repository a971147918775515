"""Frozen configuration: model shape presets and pipeline shape."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Literal

BlockStyle = Literal["gpt2", "llama"]

SCHEDULES = ("gpipe", "circular", "1f1b", "interleaved_1f1b", "zb_h1", "zbv")
# Schedules whose table is built from per-stage op orders only (gpipe and circular are too,
# without overlapped sends; with them, a ring table).
FULL_TABLE_SCHEDULES = ("1f1b", "interleaved_1f1b", "zb_h1", "zbv")
# Attention kernels (`attention.py`): "xla" runs everywhere, "cudnn" is the fused cuDNN kernel
# (NVIDIA GPUs, bfloat16 or float16 compute), "splash" the Pallas TPU splash-attention kernel
# (TPUs, sequence lengths a multiple of 128).
ATTENTION_KERNELS = ("xla", "cudnn", "splash")
# ModelConfig fields that change how a model computes, not its parameters or results: a
# checkpoint restores under any value of them.
RUNTIME_FIELDS = ("name", "attention")
REMAT_MODES = ("none", "layer", "stage")
# Models above this many parameters are only ever used abstractly (planning); `model.init_params`
# refuses to allocate them unless explicitly asked.
ALLOCATION_GUARD_PARAMS = 2_000_000_000


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says what to change."""


# Dtypes that activations (ModelConfig.dtype, PipelineConfig.boundary_dtype) may take.
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# jax.random.key keeps 32 bits of a seed; numpy's generators refuse negative ones.
MAX_SEED = 2**32 - 1


def is_int(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_float(field: str, value, low: float, low_ok: bool = True) -> None:
    """Raises unless `value` is a finite real number >= low (> low when not low_ok)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < low
        or (value == low and not low_ok)
    ):
        bound = f">= {low}" if low_ok else f"> {low}"
        raise ConfigError(f"{field} must be a finite number {bound}, got {value!r}")


def check_seed(seed, flag: str = "--seed ") -> None:
    """Seeds key JAX's generator (32 bits of it) and numpy's (>= 0): 0 <= seed < 2**32."""
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer from 0 to {MAX_SEED} (2**32 - 1), got "
                          f"{seed!r}; pass e.g. {flag}0")


def check_float_dtype(field: str, value) -> None:
    if not isinstance(value, str) or value not in FLOAT_DTYPES:
        raise ConfigError(
            f"{field} {value!r} is not supported; activations use a floating dtype, one of "
            f"{FLOAT_DTYPES}"
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer shape.

    style: "gpt2" (LayerNorm, learned positions, GELU MLP, tied embeddings) or
           "llama" (RMSNorm, RoPE, SwiGLU, grouped-query attention, untied head).
    """

    name: str = "custom"
    style: BlockStyle = "gpt2"
    vocab_size: int = 256
    num_layers: int = 4
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: same as num_heads (no grouping)
    d_ff: int | None = None  # None: 4*d_model (gpt2) or the Llama 8/3 rule rounded to 64
    max_seq_len: int = 128
    tie_embeddings: bool | None = None  # None: tied for gpt2, untied for llama
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype; parameters are always float32
    attention: str = "xla"  # attention kernel, one of ATTENTION_KERNELS

    def __post_init__(self):
        if self.style not in ("gpt2", "llama"):
            raise ConfigError(f"unknown block style {self.style!r}; use 'gpt2' or 'llama'")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(
                f"unknown attention kernel {self.attention!r}; choose one of {ATTENTION_KERNELS}"
            )
        for field in ("vocab_size", "num_layers", "d_model", "num_heads", "max_seq_len"):
            value = getattr(self, field)
            if not is_int(value) or value < 1:
                raise ConfigError(f"{field} must be >= 1, got {value!r}")
        for field in ("num_kv_heads", "d_ff"):  # None picks the default
            value = getattr(self, field)
            if value is not None and (not is_int(value) or value < 1):
                raise ConfigError(f"{field} must be None (the default) or >= 1, got {value!r}")
        if not (self.tie_embeddings is None or isinstance(self.tie_embeddings, bool)):
            raise ConfigError(f"tie_embeddings must be None, True or False, got "
                              f"{self.tie_embeddings!r}")
        check_float("rope_theta", self.rope_theta, 0.0, low_ok=False)
        check_float("norm_eps", self.norm_eps, 0.0, low_ok=False)
        check_float_dtype("dtype", self.dtype)
        if self.d_model % self.num_heads:
            raise ConfigError(
                f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}"
            )
        if self.kv_heads < 1 or self.num_heads % self.kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.kv_heads}"
            )

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.style == "gpt2":
            return 4 * self.d_model
        return 64 * math.ceil(int(8 * self.d_model / 3) / 64)

    @property
    def tied(self) -> bool:
        return self.style == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    def block_params(self) -> int:
        """Parameters of one transformer block."""
        d, hd = self.d_model, self.head_dim
        attn = d * self.num_heads * hd + 2 * d * self.kv_heads * hd + self.num_heads * hd * d
        if self.style == "gpt2":
            attn += self.num_heads * hd + 2 * self.kv_heads * hd + d  # biases
            mlp = 2 * d * self.ff_dim + self.ff_dim + d
            norms = 4 * d
        else:
            mlp = 3 * d * self.ff_dim
            norms = 2 * d
        return attn + mlp + norms

    def embed_params(self) -> int:
        pos = self.max_seq_len * self.d_model if self.style == "gpt2" else 0
        return self.vocab_size * self.d_model + pos

    def head_params(self) -> int:
        norm = 2 * self.d_model if self.style == "gpt2" else self.d_model
        return norm + (0 if self.tied else self.d_model * self.vocab_size)

    def num_params(self) -> int:
        return self.embed_params() + self.num_layers * self.block_params() + self.head_params()

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, ModelConfig] = {
    # Test sizes.
    "tiny": ModelConfig("tiny", "gpt2", 256, 4, 32, 4, None, 64, 64),
    "tiny-llama": ModelConfig("tiny-llama", "llama", 256, 4, 32, 4, 2, 64, 64),
    # Default CPU run: byte-level, trains in minutes on two cores.
    "small": ModelConfig("small", "gpt2", 256, 8, 128, 4, None, 512, 128),
    "small-llama": ModelConfig("small-llama", "llama", 256, 8, 128, 4, 2, 384, 128),
    # Real shapes.
    "gpt2": ModelConfig("gpt2", "gpt2", 50257, 12, 768, 12, None, 3072, 1024),
    "gpt2-medium": ModelConfig("gpt2-medium", "gpt2", 50257, 24, 1024, 16, None, 4096, 1024),
    "llama-1b": ModelConfig(
        "llama-1b", "llama", 128256, 16, 2048, 32, 8, 8192, 2048, rope_theta=500000.0
    ),
    "llama-3-8b": ModelConfig(
        "llama-3-8b", "llama", 128256, 32, 4096, 32, 8, 14336, 8192, rope_theta=500000.0
    ),
    "llama-3-70b": ModelConfig(
        "llama-3-70b", "llama", 128256, 80, 8192, 64, 8, 28672, 8192, rope_theta=500000.0
    ),
    "llama-65b": ModelConfig("llama-65b", "llama", 32000, 80, 8192, 64, None, 22016, 2048),
    "gpt3-175b": ModelConfig("gpt3-175b", "gpt2", 50257, 96, 12288, 96, None, 49152, 2048),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return PRESETS[name].replace(**overrides)


def check_tensor_parallel(cfg: ModelConfig, tensor: int) -> None:
    """Raises naming the fix when heads, kv heads or MLP units do not split over `tensor`.

    The one check for both the planner and the trainer (each device holds whole heads).
    """
    if tensor == 1:
        return
    for what, n in (
        ("num_heads", cfg.num_heads),
        ("num_kv_heads", cfg.kv_heads),
        ("MLP hidden size d_ff", cfg.ff_dim),
    ):
        if n % tensor:
            divisors = [t for t in range(1, n + 1) if n % t == 0]
            raise ConfigError(
                f"tensor_parallel={tensor} must divide {what}={n} of model {cfg.name!r} (each "
                f"device holds whole heads / kv groups); use --tensor_parallel in {divisors}"
            )


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How the block stack is pipelined.

    num_stages: devices along the `pipe` mesh axis.
    num_microbatches: micro-batches per step (M); the global batch must divide by M * data.
    num_repeats: virtual stages per device (R); layer groups visit the ring R times.
    schedule: "gpipe" (R = 1), "circular" (R >= 1), "1f1b", "interleaved_1f1b", and the
        zero-bubble ones with split backward: "zb_h1" (R = 1) and "zbv" (R = 2, V-shaped).
    remat: "none", "layer" (recompute each block), "stage" (save only stage inputs).
    boundary_dtype: dtype of activations sent between stages (None: compute dtype).
    data_parallel / tensor_parallel: sizes of the `data` and `tensor` mesh axes.
    embed_head: "outside" (embedding and head run on the whole mesh before and after the
        pipeline) or "inside" (the first stage embeds, the last applies the head and the loss).
    zero1: split the AdamW moments over `data` (ZeRO stage 1): gradients are reduce-scattered
        and the updated parameters all-gathered; results equal the replicated optimizer's.
    fsdp: also split the block parameters over `data`; each stage gathers its blocks once per
        step, before the tick loop (implies the moments' split).
    overlap_sends: gpipe and circular only: each stage's output is sent during the next tick,
        in one chunk per layer slot, so the transfer overlaps compute (the table's `hop` is 2:
        S - 1 more ticks of fill and drain). Pays off where links are slow next to a tick.
    """

    num_stages: int = 1
    num_microbatches: int = 1
    num_repeats: int = 1
    schedule: str = "gpipe"
    remat: str = "none"
    boundary_dtype: str | None = None
    data_parallel: int = 1
    tensor_parallel: int = 1
    embed_head: str = "outside"
    zero1: bool = False
    fsdp: bool = False
    overlap_sends: bool = False

    def __post_init__(self):
        for field in ("zero1", "fsdp", "overlap_sends"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f"{field} must be True or False, got {getattr(self, field)!r}")
        if self.embed_head not in ("outside", "inside"):
            raise ConfigError(
                f"embed_head must be 'outside' or 'inside' (embedding in the first stage, head "
                f"and loss in the last), got {self.embed_head!r}"
            )
        for field in (
            "num_stages",
            "num_microbatches",
            "num_repeats",
            "data_parallel",
            "tensor_parallel",
        ):
            value = getattr(self, field)
            if not is_int(value) or value < 1:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.schedule == "gpipe" and self.num_repeats != 1:
            raise ConfigError(
                f"schedule 'gpipe' runs each stage once (num_repeats=1), got num_repeats="
                f"{self.num_repeats}; use schedule 'circular' for repeats"
            )
        if self.schedule in ("1f1b", "zb_h1") and self.num_repeats != 1:
            raise ConfigError(
                f"schedule {self.schedule!r} runs each stage once (num_repeats=1), got "
                f"num_repeats={self.num_repeats}; use 'interleaved_1f1b' or 'zbv' for repeats"
            )
        if self.schedule == "zbv" and self.num_repeats != 2:
            raise ConfigError(
                f"schedule 'zbv' places two virtual stages on each device in a V: num_repeats "
                f"must be 2, got {self.num_repeats}"
            )
        if self.remat not in REMAT_MODES:
            raise ConfigError(f"unknown remat mode {self.remat!r}; choose one of {REMAT_MODES}")
        if self.overlap_sends and self.schedule in FULL_TABLE_SCHEDULES:
            raise ConfigError(
                f"overlap_sends runs with schedule 'gpipe' or 'circular'; {self.schedule!r} "
                f"sends within the tick, so drop --overlap_sends or pick one of those"
            )
        if self.boundary_dtype is not None:
            check_float_dtype("boundary_dtype", self.boundary_dtype)

    @property
    def num_devices(self) -> int:
        return self.data_parallel * self.num_stages * self.tensor_parallel

    @property
    def hop(self) -> int:
        """Ticks from a stage's op to the next stage's use of its output (`ScheduleTable.hop`)."""
        return 2 if self.overlap_sends else 1

    @property
    def shard_moments(self) -> bool:
        """Whether the optimizer moments are split over `data` (ZeRO-1, or FSDP)."""
        return self.zero1 or self.fsdp

    @property
    def num_virtual_stages(self) -> int:
        return self.num_stages * self.num_repeats

    def check_batch(self, batch_size: int) -> int:
        """Returns the per-micro-batch size, or raises naming the fix."""
        unit = self.num_microbatches * self.data_parallel
        if batch_size < 1 or batch_size % unit:
            raise ConfigError(
                f"batch size {batch_size} must be a positive multiple of num_microbatches x "
                f"data_parallel = {self.num_microbatches} x {self.data_parallel} = {unit}; "
                f"try batch size {max(unit, batch_size // unit * unit)}"
            )
        return batch_size // self.num_microbatches

    def check_layers(self, num_layers: int) -> None:
        if num_layers < self.num_virtual_stages:
            raise ConfigError(
                f"{num_layers} layers cannot fill num_stages x num_repeats = "
                f"{self.num_stages} x {self.num_repeats} = {self.num_virtual_stages} virtual "
                f"stages; use fewer stages or repeats, or more layers"
            )

    def replace(self, **kw) -> PipelineConfig:
        return dataclasses.replace(self, **kw)
