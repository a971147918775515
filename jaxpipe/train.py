"""Train state, AdamW step and the training loop (progress, metrics, non-finite guard)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpipe import model as M
from jaxpipe import placement
from jaxpipe.attention import check_kernel
from jaxpipe.config import (
    ConfigError,
    ModelConfig,
    PipelineConfig,
    check_float,
    check_seed,
    is_int,
)
from jaxpipe.data import TokenData
from jaxpipe.layout import StageLayout
from jaxpipe.mesh import make_mesh
from jaxpipe.pipeline import Pipeline


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_batches: int = 4
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping (0: stop at once)

    def __post_init__(self):
        if (
            isinstance(self.learning_rate, bool)
            or not isinstance(self.learning_rate, numbers.Real)
            or not math.isfinite(self.learning_rate)
            or self.learning_rate <= 0
        ):
            raise ConfigError(
                f"learning_rate must be finite and > 0, got {self.learning_rate}; pass a value "
                f"such as --learning_rate 3e-3"
            )
        lows = {"steps": 1, "batch_size": 1, "seq_len": 1, "log_every": 1, "eval_batches": 1,
                "warmup_steps": 0, "max_bad_steps": 0}
        for field, low in lows.items():
            value = getattr(self, field)
            if not is_int(value):
                raise ConfigError(f"{field} must be an integer, got {value!r}")
            if value < low:
                raise ConfigError(f"{field} must be >= {low}, got {value}")
        check_float("min_lr_ratio", self.min_lr_ratio, 0.0)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("grad_clip", self.grad_clip, 0.0, low_ok=False)
        check_seed(self.seed)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    bad_steps: jax.Array  # consecutive non-finite steps so far


def lr_schedule(tcfg: TrainConfig) -> optax.Schedule:
    warmup = max(min(tcfg.warmup_steps, tcfg.steps - 1), 1)
    return optax.warmup_cosine_decay_schedule(
        0.0,
        tcfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(tcfg.steps, warmup + 1),  # optax needs a decay after the warmup
        end_value=tcfg.learning_rate * tcfg.min_lr_ratio,
    )


def _decay_mask(params):
    """Weight decay on matrices and embeddings, not on norms or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "tok", "pos"), params
    )


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(tcfg.grad_clip),
        optax.adamw(lr_schedule(tcfg), b1=0.9, b2=0.95, weight_decay=tcfg.weight_decay,
                    mask=_decay_mask),
    )


@dataclasses.dataclass
class Trainer:
    """A pipelined model, its optimizer and a compiled step."""

    pipe: Pipeline
    tcfg: TrainConfig

    def __post_init__(self):
        self.tx = make_optimizer(self.tcfg)
        abstract = jax.eval_shape(self.pipe.to_pipeline, M.abstract_params(self.pipe.model))
        self.shardings = self.state_shardings(abstract)
        self.step_fn = self.pipe.jit(
            self._step,
            in_shardings=(self.shardings, self.pipe.batch_sharding()),
            out_shardings=(self.shardings, self.shardings.step),
            donate_argnums=0,
        )
        self.loss_fn = self.pipe.jit(self.pipe.loss)

    @classmethod
    def create(
        cls,
        model: ModelConfig,
        pcfg: PipelineConfig,
        tcfg: TrainConfig,
        layout: StageLayout | None = None,
        devices=None,
    ) -> Trainer:
        pcfg.check_batch(tcfg.batch_size)
        if tcfg.seq_len > model.max_seq_len:
            raise ConfigError(
                f"seq_len {tcfg.seq_len} exceeds the model's max_seq_len {model.max_seq_len}; "
                f"use --seq_len <= {model.max_seq_len}"
            )
        check_kernel(model, tcfg.seq_len)
        mesh = make_mesh(pcfg, devices)
        return cls(Pipeline.create(model, pcfg, mesh, layout), tcfg)

    def state_shardings(self, params):
        """Shardings of a TrainState: optimizer moments follow their parameters, split over
        `data` as well with ZeRO-1 or FSDP (`placement.over_data`)."""
        param_sh = self.pipe.param_shardings(params)
        self.moment_shardings = param_sh
        if self.pipe.config.shard_moments:
            self.moment_shardings = jax.tree.map(placement.data_sharded, param_sh, params)
        replicated = jax.sharding.NamedSharding(self.pipe.mesh, jax.sharding.PartitionSpec())
        opt_sh = optax.tree_map_params(
            self.tx,
            lambda _, sh: sh,
            jax.eval_shape(self.tx.init, params),
            self.moment_shardings,
            transform_non_params=lambda _: replicated,
        )
        return TrainState(replicated, param_sh, opt_sh, replicated)

    def _fresh_state(self, key) -> TrainState:
        params = self.pipe.init_params(key)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(zero, params, self.tx.init(params), zero)

    def abstract_state(self) -> TrainState:
        """Shapes and shardings of a TrainState, with nothing allocated."""
        shapes = jax.eval_shape(self._fresh_state, jax.random.key(self.tcfg.seed))
        return jax.tree.map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
            shapes,
            self.shardings,
        )

    def init_state(self, params=None) -> TrainState:
        """A TrainState in pipeline layout. From the seed (params None) it is built by one
        program whose outputs carry the state's shardings: every device computes only its own
        shards, so no device or host ever holds the whole model. Given canonical params, they
        are placed in the pipeline layout."""
        sh = self.shardings
        if params is None:
            init = self.pipe.jit(self._fresh_state, out_shardings=sh)
            return init(jax.random.key(self.tcfg.seed))
        params = jax.jit(self.pipe.to_pipeline, out_shardings=sh.params)(params)
        opt_state = jax.jit(self.tx.init, out_shardings=sh.opt_state)(params)
        zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), sh.step)
        return TrainState(zero(), params, opt_state, zero())

    def _step(self, state: TrainState, tokens_BT1):
        loss, grads = self.pipe.value_and_grad(state.params, tokens_BT1)
        shard = state.params
        if self.pipe.config.shard_moments:  # reduce-scatter; each device updates its own part
            grads, shard = jax.lax.with_sharding_constraint(
                (grads, shard), (self.moment_shardings,) * 2
            )
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, shard)
        if self.pipe.config.shard_moments:  # all-gather the update, add it in place
            updates = jax.lax.with_sharding_constraint(updates, self.shardings.params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params = keep(optax.apply_updates(state.params, updates), state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=keep(opt_state, state.opt_state),
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": ~finite,
                   "bad_steps": new_state.bad_steps}
        return new_state, metrics

    def put_batch(self, tokens_BT1: np.ndarray) -> jax.Array:
        """The global host batch (the same on every process) -> a global array on the mesh."""
        return placement.global_batch(tokens_BT1, self.pipe.batch_sharding())

    def eval_loss(self, params, data: TokenData) -> float:
        fn = self.loss_fn
        losses = [
            fn(params, self.put_batch(data.batch(i, self.tcfg.batch_size, self.tcfg.seq_len,
                                                 self.tcfg.seed, split="eval")))
            for i in range(self.tcfg.eval_batches)
        ]
        return float(np.mean(jax.device_get(losses)))


class NonFiniteError(RuntimeError):
    pass


class StopTraining(Exception):
    """`train` stopped after a step because `poll` returned a non-zero code; holds the state."""

    def __init__(self, code: int, state: TrainState):
        super().__init__(f"training stopped after step {int(state.step)} (code {code})")
        self.code, self.state = code, state


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train(
    trainer: Trainer,
    data: TokenData,
    workdir: str | Path | None = None,
    state: TrainState | None = None,
    on_step=None,
    poll=None,
) -> dict:
    """Runs the loop from `state` (fresh when None) to tcfg.steps; returns a summary dict.

    Metrics are fetched one step late so that dispatch stays asynchronous. `on_step(state)` is
    called after each step (for checkpointing), then `poll(step)`: a non-zero code stops the
    loop there (its metrics recorded) with `StopTraining(code, state)`.
    """
    tcfg, pipe = trainer.tcfg, trainer.pipe
    if data.vocab_size > pipe.model.vocab_size:
        raise ConfigError(
            f"data has token ids up to {data.vocab_size - 1} but the model's vocab_size is "
            f"{pipe.model.vocab_size}; pass --vocab_size >= {data.vocab_size}"
        )
    data.check(tcfg.seq_len)  # the eval split too: it is first read after the last step
    workdir = Path(workdir) if workdir and jax.process_index() == 0 else None  # process 0 writes
    if workdir:
        workdir.mkdir(parents=True, exist_ok=True)
    state = trainer.init_state() if state is None else state
    start = int(state.step)
    schedule = lr_schedule(tcfg)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    history: list[dict] = []
    metrics_file = open(workdir / "metrics.jsonl", "a") if workdir else None
    pending = None  # (step, metrics on device) of the previous step
    t_last, step_last = time.perf_counter(), start
    t_start = t_last
    compile_s = None

    def record(step: int, metrics) -> None:
        nonlocal t_last, step_last, compile_s
        m = {k: v.item() for k, v in jax.device_get(metrics).items()}
        if m["skipped"] and m["bad_steps"] > tcfg.max_bad_steps:
            raise NonFiniteError(
                f"{m['bad_steps']} consecutive non-finite steps (last at step {step + 1}, "
                f"loss {m['loss']}); stopping with parameters of the last good step. Lower "
                f"--learning_rate or check the data."
            )
        is_first = step == start
        if not (is_first or (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps):
            return
        now = time.perf_counter()
        step_time = (now - t_last) / max(step + 1 - step_last, 1)
        t_last, step_last = now, step + 1
        if is_first:
            compile_s = step_time
        row = {
            "step": step + 1,
            "loss": m["loss"],
            "grad_norm": m["grad_norm"],
            "skipped": bool(m["skipped"]),
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_step / step_time,
            "learning_rate": float(schedule(step)),
        }
        history.append(row)
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        eta = (tcfg.steps - step - 1) * step_time
        _log(
            f"step {step + 1}/{tcfg.steps} [{100 * (step + 1) / tcfg.steps:3.0f}%] "
            f"loss {m['loss']:.4f} lr {row['learning_rate']:.2e} "
            f"{row['tokens_per_s']:,.0f} tok/s {step_time * 1e3:.0f} ms/step "
            f"ETA {_fmt_time(eta)}" + (" (includes compile)" if is_first else "")
        )

    try:
        for step in range(start, tcfg.steps):
            batch = trainer.put_batch(data.batch(step, tcfg.batch_size, tcfg.seq_len, tcfg.seed))
            state, metrics = trainer.step_fn(state, batch)
            if pending is not None:
                record(*pending)
            pending = (step, metrics)
            if on_step is not None:
                on_step(state)
            code = poll(step + 1) if poll is not None else 0
            if code:
                record(*pending)
                raise StopTraining(code, state)
        if pending is not None:
            record(*pending)
    finally:
        if metrics_file:
            metrics_file.close()
    wall = time.perf_counter() - t_start
    summary = {
        "steps": tcfg.steps,
        "start_step": start,
        "final_loss": history[-1]["loss"] if history else None,
        "first_loss": history[0]["loss"] if history else None,
        "eval_loss": trainer.eval_loss(state.params, data),
        "unigram_entropy": data.unigram_entropy(),
        "wall_s": wall,
        "first_step_s": compile_s,
        "tokens_per_s": history[-1]["tokens_per_s"] if history else None,
        "layout": pipe.layout.describe(),
        "bubble_fraction": pipe.table.bubble_fraction(),
    }
    if workdir:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_loss(workdir / "metrics.jsonl", workdir / "loss.png")
    return {**summary, "state": state, "history": history}


def plot_loss(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
