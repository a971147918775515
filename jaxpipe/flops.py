"""Transformer training FLOPs counted by formula, as papers report throughput.

Per token, a block's forward multiplies by every matmul weight once (2 FLOPs per weight) and
attends to the whole sequence (QK^T and AV: 2 x 2 x seq x heads x head_dim, the causal half not
discounted); the head's forward multiplies by the vocabulary projection (2 x d x vocab). A
backward costs twice its forward; full activation recomputation runs the blocks' forward once
more (the head is not recomputed). For a GPT block with 4h MLP and no biases this is exactly
Narayanan et al. (SC'21), Eq. 3:

    F = 96 B s l h^2 (1 + s / (6 h) + V / (16 l h))

and, without recomputation, the same with 72 and V / (12 l h) (model FLOPs, for MFU).
"""

from __future__ import annotations

from jaxpipe.config import ModelConfig


def block_matmul_weights(cfg: ModelConfig) -> int:
    """Weights of one block's matmuls (no biases or norms): Q, K, V, the output, the MLP."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = 2 * d * cfg.num_heads * hd + 2 * d * cfg.kv_heads * hd
    mlp = (2 if cfg.style == "gpt2" else 3) * d * cfg.ff_dim
    return attn + mlp


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
    """(one block's, the head's) forward FLOPs per token."""
    attention = 4 * seq_len * cfg.num_heads * cfg.head_dim
    return 2 * block_matmul_weights(cfg) + attention, 2 * cfg.d_model * cfg.vocab_size


def training_flops(cfg: ModelConfig, batch: int, seq_len: int, recompute: bool = True) -> float:
    """FLOPs of one training step over `batch` sequences: forward + backward (2x), plus the
    blocks' recomputed forward when `recompute`."""
    block, head = forward_flops_per_token(cfg, seq_len)
    passes = 4 if recompute else 3
    return batch * seq_len * (passes * cfg.num_layers * block + 3 * head)


def megatron_eq3(batch: int, seq_len: int, layers: int, hidden: int, vocab: int) -> float:
    """Eq. 3 of Narayanan et al. (SC'21): a GPT step's FLOPs with full recomputation."""
    B, s, l, h, V = batch, seq_len, layers, hidden, vocab
    return 96 * B * s * l * h**2 * (1 + s / (6 * h) + V / (16 * l * h))


def model_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """The step's FLOPs without recomputation: what MFU is counted with."""
    return training_flops(cfg, batch, seq_len, recompute=False)
