"""Orbax checkpoints in the canonical `[layers, ...]` layout, restorable at any pipeline shape.

A checkpoint holds two items: `state` (canonical params, the optimizer state with its moment
trees converted to the canonical layout, the step and the non-finite counter) and `meta` (a
small JSON: model config, seed, pipeline and train configs, and a CRC32 fingerprint of every
saved array). The step is the data position: batches are a pure function of (step, seed), so
storing the seed and checking it on restore is enough to resume the data stream exactly.

Restoring verifies the fingerprint; a checkpoint that fails to load or to verify is skipped
with a warning naming it, and the previous one is tried. A checkpoint of another model shape
raises `ConfigError` naming both shapes.

Several processes (`jax.distributed`, one mesh over all of them) share one checkpoint
directory, which every process must see (a shared file system, or one machine). Saving,
restoring and listing are then collective: every process calls them in the same order.
Each process writes its share of the arrays; process 0 alone creates the directory, writes the
JSON metadata, commits a step and deletes old or corrupt steps. Process 0 lists the steps and
broadcasts the list, and a checkpoint counts as good only if it verified on every process, so
that all processes restore the same step and keep issuing the same collectives. The restored
arrays are global (replicated over the whole mesh) and then placed in the pipeline layout. A
checkpoint saved by N processes restores in any number of processes, at any pipeline shape.
`load_params` is the exception: it reads in the calling process alone.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxpipe import model as M
from jaxpipe.config import RUNTIME_FIELDS, ConfigError, ModelConfig
from jaxpipe.data import TokenData
from jaxpipe.train import NonFiniteError, TrainConfig, Trainer, TrainState, make_optimizer, train

FORMAT = 1
CKPT_DIR = "checkpoints"


def _is_params(x) -> bool:
    return isinstance(x, dict) and set(x) == {"embed", "blocks", "head"}


def _map_params(fn, tree):
    """Applies fn to every params-shaped dict in tree (the params and the AdamW moments)."""
    return jax.tree.map(lambda x: fn(x) if _is_params(x) else x, tree, is_leaf=_is_params)


@functools.lru_cache(maxsize=32)
def _canonicalizer(pipe):
    """One compiled conversion per pipeline (saves must not recompile)."""
    replicated = NamedSharding(pipe.mesh, P())

    @jax.jit
    def convert(state):
        tree = {
            "params": state.params,
            "opt_state": state.opt_state,
            "step": state.step,
            "bad_steps": state.bad_steps,
        }
        tree = _map_params(pipe.to_canonical, tree)
        return jax.lax.with_sharding_constraint(tree, replicated)

    return convert


def canonical_state(trainer: Trainer, state: TrainState) -> dict:
    """The train state as a shape-independent tree (params and moments in `[L, ...]` layout)."""
    return _canonicalizer(trainer.pipe)(state)


def abstract_canonical(model: ModelConfig, tx, sharding) -> dict:
    """Shapes of `canonical_state` for a model and optimizer, placed on `sharding` at restore."""
    params = M.abstract_params(model)
    tree = {
        "params": params,
        "opt_state": jax.eval_shape(tx.init, params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "bad_steps": jax.ShapeDtypeStruct((), jnp.int32),
    }
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def place_state(trainer: Trainer, tree: dict) -> TrainState:
    """A canonical tree -> TrainState in this trainer's pipeline layout and shardings."""
    tree = _map_params(trainer.pipe.to_pipeline, tree)
    state = TrainState(tree["step"], tree["params"], tree["opt_state"], tree["bad_steps"])
    return jax.device_put(state, trainer.shardings)


def fingerprint(tree) -> dict[str, list]:
    """Shape, dtype and CRC32 of every leaf, keyed by its path."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.ascontiguousarray(jax.device_get(leaf))
        out[jax.tree_util.keystr(path)] = [list(a.shape), str(a.dtype), zlib.crc32(a.tobytes())]
    return out


def describe_model(cfg: ModelConfig) -> str:
    return (
        f"{cfg.name} ({cfg.style}, {cfg.num_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.num_heads} heads/{cfg.kv_heads} kv, d_ff {cfg.ff_dim}, vocab {cfg.vocab_size}, "
        f"max_seq_len {cfg.max_seq_len})"
    )


def check_model(saved: ModelConfig, wanted: ModelConfig, where: str) -> None:
    """Raises ConfigError when the two configs differ in anything that shapes the parameters
    or the results (not in the name or the attention kernel)."""
    a, b = dataclasses.asdict(saved), dataclasses.asdict(wanted)
    diff = [f"{k} {a[k]} vs {b[k]}" for k in a if k not in RUNTIME_FIELDS and a[k] != b[k]]
    if diff:
        raise ConfigError(
            f"checkpoint {where} holds model {describe_model(saved)} but this run builds "
            f"{describe_model(wanted)} (differs in {', '.join(diff)}); use the same model flags "
            f"as the saved run, or another --workdir"
        )


class CorruptCheckpoint(Exception):
    pass


def _agree(ok: bool) -> bool:
    """True when `ok` holds in every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


class Checkpoints:
    """Saves every `every` steps (async), keeps the last `keep`, restores the newest good one.

    With several processes every process constructs it and calls `save`, `restore` and `steps`
    at the same points (they synchronise the processes). `read_only=True` makes a reader that
    touches nothing and involves no other process (what `load_params` uses).
    """

    def __init__(
        self,
        workdir: str | Path,
        every: int = 100,
        keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if every < 1 or keep < 1:
            raise ConfigError(
                f"checkpoint_every and keep_checkpoints must be >= 1, got {every} and {keep}"
            )
        self.directory = Path(workdir).absolute() / CKPT_DIR
        self.every = every
        self.read_only = read_only
        if read_only:  # this process alone: no barriers, no broadcast of the step list
            me = jax.process_index()
            options = ocp.CheckpointManagerOptions(
                create=False,
                enable_async_checkpointing=False,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=me, active_processes={me}
                ),
            )
        else:
            # Process 0 lists the steps and broadcasts them: a step that process 0 deletes
            # (or commits) while another process lists the directory cannot make the
            # processes disagree about which steps exist.
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=async_save,
                single_host_load_and_broadcast=True,
            )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def steps(self) -> list[int]:
        """The committed steps, read from disk (the same list in every process)."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, trainer: Trainer, state: TrainState, force: bool = False) -> bool:
        """Saves unless the step is off the interval (or force); returns whether it saved."""
        if self.read_only:
            raise ValueError(f"{self.directory} was opened read-only")
        step = int(state.step)
        if not force and step % self.every:
            return False
        if int(state.bad_steps):  # never replace a good checkpoint by one taken mid-trouble
            return False
        if step in self.manager.all_steps():
            return False
        tree = canonical_state(trainer, state)
        meta = {
            "format": FORMAT,
            "step": step,
            "seed": trainer.tcfg.seed,
            "model": dataclasses.asdict(trainer.pipe.model),
            "pipeline": dataclasses.asdict(trainer.pipe.config),
            "train": dataclasses.asdict(trainer.tcfg),
            "fingerprint": fingerprint(tree),
        }
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def read_meta(self, step: int) -> dict:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = meta["meta"]
        except Exception as e:  # noqa: BLE001 - any failure means an unreadable checkpoint
            raise CorruptCheckpoint(f"metadata unreadable ({type(e).__name__}: {e})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "fingerprint" not in meta:
            raise CorruptCheckpoint("metadata missing or of an unknown format")
        return meta

    def restore_tree(self, step: int, target: dict, model: ModelConfig, seed: int | None):
        """(meta, verified canonical tree) of one step; ConfigError on a model/seed mismatch."""
        meta = self.read_meta(step)
        check_model(ModelConfig(**meta["model"]), model, str(self.path(step)))
        if seed is not None and meta["seed"] != seed:
            raise ConfigError(
                f"checkpoint {self.path(step)} was trained with seed {meta['seed']} but this run "
                f"uses seed {seed}; the data order would differ. Pass --seed {meta['seed']} or "
                f"use another --workdir"
            )
        try:
            tree = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )["state"]
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpoint(f"arrays unreadable ({type(e).__name__}: {e})") from e
        got = fingerprint(tree)
        if got != meta["fingerprint"]:
            bad = sorted(
                k
                for k in set(got) | set(meta["fingerprint"])
                if got.get(k) != meta["fingerprint"].get(k)
            )
            raise CorruptCheckpoint(f"fingerprint mismatch in {len(bad)} arrays, e.g. {bad[0]}")
        return meta, tree

    def newest_good(self, restore_one):
        """restore_one(step) for the newest step where it succeeds (in every process, unless
        read-only); None when it fails on every step."""
        for step in reversed(self.steps()):
            try:
                found, error = restore_one(step), None
            except CorruptCheckpoint as e:
                found, error = None, str(e)
            ok = error is None if self.read_only else _agree(error is None)
            if ok:
                return found
            error = error or "it failed to load or to verify in another process"
            print(f"warning: skipping corrupt checkpoint {self.path(step)}: {error}", flush=True)
        return None

    def restore(self, trainer: Trainer, step: int | None = None) -> TrainState | None:
        """The newest verified checkpoint (or `step`) placed for `trainer`; None when none."""
        target = abstract_canonical(
            trainer.pipe.model, trainer.tx, NamedSharding(trainer.pipe.mesh, P())
        )
        one = lambda s: self.restore_tree(s, target, trainer.pipe.model, trainer.tcfg.seed)[1]
        tree = one(step) if step is not None else self.newest_good(one)
        if tree is None and self.steps():
            raise ConfigError(
                f"every checkpoint in {self.directory} is corrupt (steps {self.steps()}); "
                f"delete them or use another --workdir"
            )
        return None if tree is None else place_state(trainer, tree)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def train_resumable(
    trainer: Trainer,
    data: TokenData,
    workdir: str | Path,
    every: int = 100,
    keep: int = 3,
    resume: bool = True,
    async_save: bool = True,
    on_step=None,
    init_params=None,
) -> dict:
    """`train` with checkpoints in WORKDIR/checkpoints, resuming from the newest good one.

    Saves every `every` steps and at the last step; with resume=False an existing checkpoint
    is an error rather than silently mixed with the new run's. A fresh run starts from
    `init_params` (canonical; e.g. a Hugging Face checkpoint) or from the seed.
    """
    with Checkpoints(workdir, every, keep, async_save) as ckpts:
        if not resume and ckpts.steps():
            raise ConfigError(
                f"{ckpts.directory} already holds checkpoints {ckpts.steps()}; resume from them "
                f"(--resume), or use another --workdir"
            )
        state = ckpts.restore(trainer) if resume else None
        step = 0 if state is None else int(state.step)
        if state is None and init_params is not None:
            state = trainer.init_state(init_params)
        if state is not None and jax.process_index() == 0:
            print(f"resuming from step {step} ({ckpts.path(step)})", flush=True)
        for newer in [s for s in ckpts.steps() if s > step]:  # skipped as corrupt: replace them
            if jax.process_index() == 0:
                print(f"deleting corrupt checkpoint {ckpts.path(newer)}", flush=True)
            ckpts.manager.delete(newer)  # every process calls it; process 0 deletes

        def hook(s):
            nonlocal step
            step += 1
            if step % every == 0 or step == trainer.tcfg.steps:
                ckpts.save(trainer, s, force=True)
            if on_step is not None:
                on_step(s)

        try:
            return train(trainer, data, workdir, state, on_step=hook)
        except NonFiniteError as e:
            ckpts.wait()
            steps = ckpts.steps()
            where = f"{ckpts.path(steps[-1])}" if steps else "none saved yet"
            raise NonFiniteError(f"{e} Last good checkpoint: {where}.") from None


def load_params(workdir: str | Path, step: int | None = None, device=None):
    """(ModelConfig, canonical params) of the newest good checkpoint, for the reference model.

    The whole saved state is read so that its fingerprint can be verified; only params are
    returned, on one device of this process (default: its first). It reads in this process
    alone, so with several processes any of them may call it (a checkpoint saved by several
    processes loads in one).
    """
    ckpts = Checkpoints(workdir, read_only=True)
    sharding = SingleDeviceSharding(device or jax.local_devices()[0])

    def one(s):
        meta = ckpts.read_meta(s)
        model = ModelConfig(**meta["model"])
        tx = make_optimizer(TrainConfig(**meta["train"]))
        target = abstract_canonical(model, tx, sharding)
        return model, ckpts.restore_tree(s, target, model, None)[1]["params"]

    try:
        steps = ckpts.steps()
        if not steps:
            raise ConfigError(
                f"no checkpoint in {ckpts.directory}; train with --workdir {workdir} first"
            )
        found = one(step) if step is not None else ckpts.newest_good(one)
        if found is None:
            raise ConfigError(f"every checkpoint in {ckpts.directory} is corrupt (steps {steps})")
        return found
    finally:
        ckpts.close()
