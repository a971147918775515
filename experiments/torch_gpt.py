"""jaxpipe's GPT-2-style model in plain torch, for side-by-side benchmarks (`bench_peers.py`).

The parameters have jaxpipe's shapes and names: Dense kernels are [in, out], a stage's state
dict names `blocks.{i}.attn.q.kernel` for the i-th layer it holds (jaxpipe stacks the same leaf
on a leading layers axis), `embed.tok`, `embed.pos`, `head.norm.scale`. `load_params` copies
jaxpipe's canonical parameters in, so both frameworks start from the same loss, which
`check_loss` verifies. `stage_worker` runs one stage of a `torch.distributed.pipelining`
pipeline in its own gloo process.
"""

from __future__ import annotations

import os
import time
import traceback

import jax
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from jaxpipe import model as M
from jaxpipe.config import ConfigError, ModelConfig

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class LossMismatch(RuntimeError):
    """The two frameworks compute different losses from the same parameters and batch."""


def check_config(cfg: ModelConfig) -> None:
    """The torch copy covers jaxpipe's GPT-2 blocks in float32 (no grouped heads, tied head)."""
    if cfg.style != "gpt2" or cfg.kv_heads != cfg.num_heads or not cfg.tied:
        raise ConfigError(
            f"the torch copy of the model covers gpt2-style blocks with tied embeddings and no "
            f"grouped heads; model {cfg.name!r} is {cfg.style} (kv_heads {cfg.kv_heads}, tied "
            f"{cfg.tied}); use --model small or tiny"
        )
    if cfg.dtype != "float32":
        raise ConfigError(f"the torch copy computes in float32, model {cfg.name!r} in {cfg.dtype}")


class Dense(nn.Module):
    """x @ kernel + bias with a Flax-shaped kernel [in, out]."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.zeros(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.kernel).reshape(
            *x.shape[:-1], -1
        )


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.scale, self.bias, self.eps)


class Attention(nn.Module):
    """Causal self-attention through `F.scaled_dot_product_attention` (torch's fused kernel)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hk = cfg.d_model, cfg.num_heads * cfg.head_dim
        self.q, self.k, self.v, self.o = Dense(d, hk), Dense(d, hk), Dense(d, hk), Dense(hk, d)
        self.heads = cfg.num_heads

    def forward(self, x_BTD):
        B, T, _ = x_BTD.shape
        split = lambda t: t.reshape(B, T, self.heads, -1).transpose(1, 2)  # [B, H, T, K]
        out_BHTK = F.scaled_dot_product_attention(
            split(self.q(x_BTD)), split(self.k(x_BTD)), split(self.v(x_BTD)), is_causal=True
        )
        return self.o(out_BHTK.transpose(1, 2).reshape(B, T, -1))


class Mlp(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up, self.down = Dense(cfg.d_model, cfg.ff_dim), Dense(cfg.ff_dim, cfg.d_model)

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then + mlp(norm(.)), as jaxpipe's `model.Block`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = LayerNorm(cfg.d_model, cfg.norm_eps), Attention(cfg)
        self.mlp_norm, self.mlp = LayerNorm(cfg.d_model, cfg.norm_eps), Mlp(cfg)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Embed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.d_model))
        self.pos = nn.Parameter(torch.zeros(cfg.max_seq_len, cfg.d_model))

    def forward(self, tokens_BT):
        return self.tok[tokens_BT] + self.pos[: tokens_BT.shape[1]]


class Head(nn.Module):
    """Final norm and the tied projection; a stage without the embedding holds its own copy of
    the table (`head.tok`), whose gradient the pipeline adds to the embedding's."""

    def __init__(self, cfg: ModelConfig, own_table: bool):
        super().__init__()
        self.norm = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.tok = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.d_model)) if own_table else None

    def forward(self, x_BTD, table_VD):
        return self.norm(x_BTD) @ table_VD.t()


class GPTStage(nn.Module):
    """Layers `layers` of the model, with the embedding first if `embed` and the head last if
    `head`: the whole model when it has all three."""

    def __init__(self, cfg: ModelConfig, layers: range, embed: bool, head: bool):
        super().__init__()
        check_config(cfg)
        self.layer_ids = layers
        self.embed = Embed(cfg) if embed else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in layers)
        self.head = Head(cfg, own_table=not embed) if head else None

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            table = self.head.tok if self.embed is None else self.embed.tok
            x = self.head(x, table)
        return x

    def tied_table(self) -> nn.Parameter | None:
        """This stage's copy of the tied table when the pipeline holds two (first and last)."""
        if (self.embed is None) == (self.head is None):
            return None
        return self.embed.tok if self.embed is not None else self.head.tok


def _flat(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def load_params(stage: GPTStage, params) -> None:
    """Copies jaxpipe's canonical parameters (`model.init_params`) into `stage`; raises when a
    name or shape differs."""
    flat = {}
    if stage.embed is not None:
        flat.update(_flat(params["embed"], "embed."))
    for i, layer in enumerate(stage.layer_ids):
        flat.update((f"blocks.{i}.{k}", v[layer]) for k, v in _flat(params["blocks"]))
    if stage.head is not None:
        flat.update(_flat(params["head"], "head."))
        if stage.embed is None:
            flat["head.tok"] = params["embed"]["tok"]
    state = stage.state_dict()
    if set(flat) != set(state):
        raise ValueError(
            f"parameter names differ: jaxpipe only {sorted(set(flat) - set(state))}, torch "
            f"only {sorted(set(state) - set(flat))}"
        )
    for name, value in flat.items():
        if tuple(np.shape(value)) != tuple(state[name].shape):
            raise ValueError(
                f"{name}: jaxpipe shape {np.shape(value)}, torch {tuple(state[name].shape)}"
            )
    stage.load_state_dict({k: torch.tensor(np.asarray(v, np.float32)) for k, v in flat.items()})


def loss_fn(logits_BTV, targets_BT):
    """Mean next-token cross-entropy, as `model.cross_entropy`."""
    return F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())


def whole_model(cfg: ModelConfig, params) -> GPTStage:
    model = GPTStage(cfg, range(cfg.num_layers), embed=True, head=True)
    load_params(model, params)
    return model


def check_loss(cfg: ModelConfig, params, tokens_BT1, rtol: float) -> tuple[float, float]:
    """(jaxpipe loss, torch loss) of the same parameters on tokens [B, T+1]; raises
    `LossMismatch` unless they agree to `rtol` relative."""
    tokens_BT1 = np.asarray(tokens_BT1)
    ref = float(jax.jit(M.reference_loss, static_argnums=0)(cfg, params, tokens_BT1))
    model = whole_model(cfg, jax.tree.map(np.asarray, params))
    t = torch.from_numpy(tokens_BT1.astype(np.int64))
    with torch.no_grad():
        got = float(loss_fn(model(t[:, :-1]), t[:, 1:]))
    check_close("torch, unpipelined", got, ref, rtol)
    return ref, got


def check_close(what: str, loss: float, ref: float, rtol: float) -> None:
    if not abs(loss - ref) <= rtol * abs(ref):
        raise LossMismatch(
            f"{what} loss {loss!r} differs from jaxpipe's reference loss {ref!r} by "
            f"{abs(loss - ref) / abs(ref):.2e} relative (allowed {rtol:g}); the two models are "
            f"not the same computation"
        )


def stage_worker(rank: int, world: int, port: int, cfg: ModelConfig, params, tokens_BT1,
                 microbatches: int, threads: int, conn) -> None:
    """One pipeline stage in its own gloo process, driven over `conn`.

    Sends ("ready",), then answers each ("step", schedule) with ("done", wall seconds from the
    barrier before the step to the one after it, this process's CPU seconds in the step, mean
    loss on the last stage else None) until ("stop",). Any failure is sent as ("error", text).
    """
    try:
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        per = cfg.num_layers // world
        first, last = rank == 0, rank == world - 1
        module = GPTStage(cfg, range(rank * per, (rank + 1) * per), embed=first, head=last)
        load_params(module, params)
        tied = dist.new_group([0, world - 1])  # every rank takes part in creating a group
        table = module.tied_table()
        t = torch.from_numpy(np.asarray(tokens_BT1).astype(np.int64))
        inputs, targets = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        schedules = {
            name: cls(
                PipelineStage(module, rank, world, torch.device("cpu")),
                n_microbatches=microbatches,
                loss_fn=loss_fn,
            )
            for name, cls in SCHEDULES.items()
        }

        def step(schedule):
            module.zero_grad(set_to_none=True)
            losses = []
            if first:
                schedule.step(inputs)
            elif last:
                schedule.step(target=targets, losses=losses, return_outputs=False)
            else:
                schedule.step()
            if table is not None:  # the tied table's gradient is the sum of both uses
                dist.all_reduce(table.grad, group=tied)
            return torch.stack(losses).mean().item() if losses else None

        conn.send(("ready",))
        while (msg := conn.recv())[0] == "step":
            dist.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            loss = step(schedules[msg[1]])
            cpu = time.process_time() - cpu
            dist.barrier()
            conn.send(("done", time.perf_counter() - wall, cpu, loss))
        dist.destroy_process_group()
    except BaseException:
        conn.send(("error", f"stage {rank}: {traceback.format_exc()}"))
