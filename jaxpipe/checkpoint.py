"""Orbax checkpoints in the canonical `[layers, ...]` layout, restorable at any pipeline shape.

A checkpoint holds two items: `state` (canonical params, the optimizer state with its moment
trees converted to the canonical layout, the step and the non-finite counter) and `meta` (a
small JSON: model config, seed, pipeline and train configs, and a fingerprint of every saved
array). The step is the data position: batches are a pure function of (step, seed), so
storing the seed and checking it on restore is enough to resume the data stream exactly.

No array is ever gathered whole, to a host or to a device. The canonical state is split the way
the trainer splits the state (`canonical_shardings`: its `tensor`, `data` or other splits of
each leaf, and the layers of block leaves over the stack axes where L divides evenly); each
process writes the shards its devices hold. The fingerprint (format 2, `fingerprint.py`) is a
64-bit digest per array that each device computes over its own shard, the partial digests
combined on the devices; it does not depend on the split, so it verifies at any mesh shape and
process count. A restore reads each shard on the devices that hold it in the restoring trainer's
canonical split, verifies the digests the same way, and moves the shards into the pipeline
layout on the devices. Checkpoints of format 1 (a CRC32 of each whole array) still restore:
verifying them gathers each array to every host, one at a time; the next save writes format 2.

Restoring verifies the fingerprint; a checkpoint proven corrupt (its metadata or arrays do not
parse, or they fail the fingerprint) is skipped with a warning naming it, and the previous one is
tried; `train_resumable` then moves it aside to `checkpoints/corrupt/<step>` (never deletes it).
A checkpoint that cannot be read for another reason (a permission or I/O error: every file is
opened before it is restored) is not corrupt and is never touched: training refuses to start
with `CheckpointIOError` naming it (a reader such as `load_params` skips it with a warning).
A checkpoint of another model shape raises `ConfigError` naming both shapes. A save that fails
(in orbax's background threads too) stops training with `CheckpointIOError` naming the path and
the reason, within a step; the checkpoints saved before it are untouched. Orbax's temporary
directories of a save that never finished (the process was killed) are removed when training
resumes: they hold nothing committed.

Several processes (`jax.distributed`, one mesh over all of them) share one checkpoint
directory, which every process must see (a shared file system, or one machine). Saving,
restoring and listing are then collective: every process calls them in the same order.
Each process writes its share of the arrays; process 0 alone creates the directory, writes the
JSON metadata, commits a step, deletes old steps and moves corrupt ones aside. Process 0 lists
the steps and broadcasts the list. Each process reads the metadata and its own shards alone
(no barrier to leave the others waiting when its read fails), then the processes agree on the
outcome before the digests are combined; a checkpoint counts as good only if it read and
verified in every process, so that all processes restore the same step and keep issuing the
same collectives (a checkpoint unreadable in any process stops every process). A checkpoint
saved by N processes restores in any number of processes, at any pipeline shape.
`load_params` is the exception: it reads in the calling process alone, onto one device.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxpipe import model as M
from jaxpipe import placement
from jaxpipe.config import RUNTIME_FIELDS, ConfigError, ModelConfig
from jaxpipe.data import TokenData
from jaxpipe.fingerprint import crc32_fingerprint, fingerprint, mismatches
from jaxpipe.interrupt import SAVE_FAILED, Agreement, Interrupts, agree_max, signal_name
from jaxpipe.train import (
    NonFiniteError,
    StopTraining,
    TrainConfig,
    Trainer,
    TrainState,
    make_optimizer,
    train,
)

FORMAT = 2  # 2: digests of sharded arrays (fingerprint.py); 1: CRC32 of whole arrays
FINGERPRINTS = {1: crc32_fingerprint, 2: fingerprint}  # how each format fingerprints arrays
CKPT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt"  # CKPT_DIR/corrupt/<step>: corrupt checkpoints moved aside
TMP_MARK = ".orbax-checkpoint-tmp"  # in the names of orbax's not yet committed directories
ITEMS = ("state", "meta")  # the orbax items of a step


def _is_params(x) -> bool:
    return isinstance(x, dict) and set(x) == {"embed", "blocks", "head"}


def _map_params(fn, tree):
    """Applies fn to every params-shaped dict in tree (the params and the AdamW moments)."""
    return jax.tree.map(lambda x: fn(x) if _is_params(x) else x, tree, is_leaf=_is_params)


def _layers_spec(sharding, ndim: int, num_layers: int):
    """The canonical `[L, ...]` sharding of a block leaf from its `[S, R, J, ...]` one: the
    mesh axes of the stack dims go on L when L divides over them (else those of S alone, else
    none); the leaf's own dims keep theirs."""
    if not isinstance(sharding, NamedSharding):
        return None
    mesh = sharding.mesh
    entries = tuple(sharding.spec) + (None,) * (ndim + 2 - len(sharding.spec))
    names = lambda e: () if e is None else (e if isinstance(e, tuple) else (e,))
    lead = None
    for axes in ([a for e in entries[:3] for a in names(e)], list(names(entries[0]))):
        size = int(np.prod([mesh.shape[a] for a in axes]))
        if axes and num_layers % size == 0:
            lead = axes[0] if len(axes) == 1 else tuple(axes)
            break
    return NamedSharding(mesh, P(lead, *entries[3:]))


def canonical_shardings(trainer: Trainer) -> dict:
    """Shardings of `canonical_state`, from the trainer's: block leaves split like the trainer
    splits them (`tensor` dims on `tensor`, layers on the stack axes where L divides evenly),
    every other leaf as the trainer places it (`placement.fit` where the pipeline layout pads
    the vocabulary). Saves write, and restores read, each
    shard on the devices that hold it."""
    sh = trainer.shardings
    abstract = abstract_canonical(trainer.pipe.model, trainer.tx, None)
    tree = {"params": sh.params, "opt_state": sh.opt_state, "step": sh.step,
            "bad_steps": sh.bad_steps}
    replicated = NamedSharding(trainer.pipe.mesh, P())
    L = trainer.pipe.model.num_layers

    def canonical(params, shapes):
        fit = lambda part: jax.tree.map(
            lambda s, a: placement.fit(s, a.shape), params[part], shapes[part],
            is_leaf=_is_sharding,
        )
        blocks = jax.tree.map(
            lambda s, a: _layers_spec(s, a.ndim, L) or replicated, params["blocks"],
            shapes["blocks"],
        )
        return {"embed": fit("embed"), "blocks": blocks, "head": fit("head")}

    def walk(shardings, shapes):
        if _is_params(shardings):
            return canonical(shardings, shapes)
        return shardings

    return jax.tree.map(walk, tree, abstract, is_leaf=lambda x: _is_params(x) or _is_sharding(x))


def _is_sharding(x) -> bool:
    return isinstance(x, jax.sharding.Sharding)


def _frozen(tree) -> tuple:
    """A hashable form of a tree of shardings (its structure and leaves)."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_sharding)
    return treedef, tuple(leaves)


@functools.lru_cache(maxsize=32)
def _converter(pipe, to_canonical: bool, treedef, shardings: tuple):
    """One compiled conversion per pipeline and placement (saves must not recompile)."""
    out = jax.tree.unflatten(treedef, shardings)
    if to_canonical:

        def convert(state):
            tree = {"params": state.params, "opt_state": state.opt_state, "step": state.step,
                    "bad_steps": state.bad_steps}
            return _map_params(pipe.to_canonical, tree)

    else:

        def convert(tree):
            tree = _map_params(pipe.to_pipeline, tree)
            return TrainState(tree["step"], tree["params"], tree["opt_state"], tree["bad_steps"])

    return jax.jit(convert, out_shardings=out)


def canonical_state(trainer: Trainer, state: TrainState) -> dict:
    """The train state as a shape-independent tree (params and moments in `[L, ...]` layout),
    sharded by `canonical_shardings` (no array is gathered)."""
    return _converter(trainer.pipe, True, *_frozen(canonical_shardings(trainer)))(state)


def abstract_canonical(model: ModelConfig, tx, sharding) -> dict:
    """Shapes of `canonical_state` for a model and optimizer, placed at restore on `sharding`:
    one sharding for every leaf, or a tree of them (`canonical_shardings`)."""
    params = M.abstract_params(model)
    tree = {
        "params": params,
        "opt_state": jax.eval_shape(tx.init, params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "bad_steps": jax.ShapeDtypeStruct((), jnp.int32),
    }
    if sharding is None or _is_sharding(sharding):
        sharding = jax.tree.map(lambda _: sharding, tree)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sharding,
        is_leaf=_is_sharding,
    )


def place_state(trainer: Trainer, tree: dict) -> TrainState:
    """A canonical tree -> TrainState in this trainer's pipeline layout and shardings, each
    shard computed on its own devices."""
    return _converter(trainer.pipe, False, *_frozen(trainer.shardings))(tree)


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
    """A checkpoint proven corrupt: its files are readable but do not parse or verify."""


class UnreadableCheckpoint(Exception):
    """A checkpoint whose files cannot be read (permissions, I/O errors): not proven corrupt."""


class CheckpointIOError(RuntimeError):
    """Checkpoints cannot be read or saved for a reason outside the run (permissions, I/O)."""


class Interrupted(RuntimeError):
    """Training stopped by SIGINT or SIGTERM, after saving a checkpoint at the agreed step."""

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum, self.step = signum, step


def _barrier(name: str) -> None:
    """Every process waits here for the others (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _reason(e: BaseException, limit: int = 200) -> str:
    """One line: `Type: message`, a TensorStore error as `CODE reading <file>` (its message
    carries a JSON spec of dozens of lines), at most `limit` characters."""
    text = str(e).strip()
    code = re.match(r"([A-Z_]{4,}): ", text)
    files = re.findall(r'local file "([^"]+)"', text)
    if code and files:
        return f"{code.group(1)} reading {files[-1]}"
    first = (text.splitlines() or [""])[0]
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _abandoned_read(exc: BaseException | None) -> bool:
    """The noise of TensorStore reads still in flight when orbax gave up on a checkpoint."""
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or (
        isinstance(exc, ValueError) and "tensorstore_spec" in str(exc)
    )


@functools.cache
def _quiet_abandoned_reads() -> None:
    """When orbax fails to restore a corrupt checkpoint, the reads of its other arrays end on
    a closed event loop and print a traceback each (or log their whole TensorStore spec): one
    warning names the checkpoint instead. Other unraisable errors and logs pass through."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _abandoned_read(unraisable.exc_value):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda r: not (r.exc_info and _abandoned_read(r.exc_info[1]))
        and "tensorstore_spec" not in r.getMessage()
    )


def _io_error(e: BaseException) -> OSError | None:
    """The OSError (other than a missing file) in e's chain of causes, if any."""
    while e is not None:
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            return e
        e = e.__cause__ or e.__context__
    return None


def check_readable(step_dir: Path) -> None:
    """Opens every file of a checkpoint (reading a byte); UnreadableCheckpoint on an OSError.

    A permission or I/O error must not be mistaken for corruption: orbax reports an unreadable
    directory as a pytree structure mismatch, indistinguishable from a damaged checkpoint.
    """

    def fail(e: OSError):
        raise UnreadableCheckpoint(_reason(e)) from e

    try:
        if not step_dir.is_dir():
            raise NotADirectoryError(20, "not a directory", str(step_dir))
        for root, _, files in os.walk(step_dir, onerror=fail):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    f.read(1)
    except OSError as e:
        fail(e)


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
        _quiet_abandoned_reads()
        self.directory = Path(workdir).absolute() / CKPT_DIR
        self.every = every
        self.read_only = read_only
        # Reads run in each process alone (no orbax barrier): a read that fails in one process
        # cannot leave the others waiting; the processes then agree on the outcome.
        me = jax.process_index()
        local = ocp.CheckpointManagerOptions(
            create=False,
            enable_async_checkpointing=False,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}
            ),
        )
        # Process 0 lists the steps and broadcasts them: a step that process 0 deletes (or
        # commits) while another process lists the directory cannot make the processes
        # disagree about which steps exist.
        shared = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            single_host_load_and_broadcast=True,
        )
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(
                f"{self.directory} is a file, not a directory of checkpoints; move it away or "
                f"use another --workdir"
            )
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=local if read_only else shared, item_names=ITEMS
            )
            self.reader = (
                self.manager
                if read_only
                else ocp.CheckpointManager(self.directory, options=local, item_names=ITEMS)
            )
        except OSError as e:
            raise CheckpointIOError(
                f"cannot open the checkpoint directory {self.directory} ({_reason(e)}); make it "
                f"readable and writable, or use another --workdir"
            ) from e
        self.failure: str | None = None  # why the newest save failed, once known
        self._saving: int | None = None  # step of the newest save started
        self._saved: list[int] = []  # steps this object saved

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
        if step in self.manager.all_steps() or not self.wait():  # the previous save first
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
        self._saving = step
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
        except Exception as e:  # noqa: BLE001 - a synchronous save, or the previous async one
            self._failed(e)
            return False
        self._saved.append(step)
        return saved

    def _failed(self, e: BaseException) -> None:
        if self.failure is None:
            where = self.path(self._saving) if self._saving is not None else self.directory
            self.failure = f"could not save checkpoint {where} ({_reason(e)})"

    def check(self) -> bool:
        """False once a save failed (a background save's error is picked up here, at once)."""
        if self.failure is None and not self.read_only:
            try:
                self.manager.check_for_errors()
                if not self.manager.is_saving_in_progress():
                    self.manager.wait_until_finished()  # at once; raises a failed save's error
            except Exception as e:  # noqa: BLE001
                self._failed(e)
        return self.failure is None

    def committed_on_disk(self) -> list[int]:
        """The committed steps as this process sees the directory (no collective)."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit() and (self.directory / n).is_dir())

    def save_error(self, other: bool = False) -> CheckpointIOError:
        """The error that ends a run whose save failed (here, or in another process)."""
        steps = self.committed_on_disk()
        newest = f"the newest saved checkpoint is {self.path(steps[-1])}" if steps else "none"
        what = self.failure or "a checkpoint save failed in another process"
        return CheckpointIOError(
            f"{what}; {newest}. Make {self.directory} writable (or free space) and rerun the "
            f"same command to resume"
        )

    def read_meta(self, step: int) -> dict:
        """The step's metadata, after checking that every file of the step can be read."""
        check_readable(self.path(step))
        try:
            meta = self.reader.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = meta["meta"]
        except Exception as e:  # noqa: BLE001 - an I/O error, or a corrupt checkpoint
            if _io_error(e):
                raise UnreadableCheckpoint(_reason(_io_error(e))) from e
            raise CorruptCheckpoint(f"metadata unreadable ({_reason(e)})") from e
        if (
            not isinstance(meta, dict)
            or meta.get("format") not in FINGERPRINTS
            or "fingerprint" not in meta
        ):
            raise CorruptCheckpoint("metadata missing or of an unknown format")
        if meta.get("step") != step:
            raise CorruptCheckpoint(f"its metadata is of step {meta.get('step')!r}, not {step}")
        try:
            ModelConfig(**meta["model"])
            if not isinstance(meta["fingerprint"], dict) or not isinstance(meta["seed"], int):
                raise TypeError("fingerprint or seed of the wrong type")
        except Exception as e:  # noqa: BLE001 - ConfigError, TypeError, KeyError
            raise CorruptCheckpoint(f"metadata malformed ({_reason(e)})") from e
        return meta

    def restore_tree(
        self,
        step: int,
        target: dict,
        model: ModelConfig,
        seed: int | None,
        tcfg: TrainConfig | None = None,
    ):
        """(meta, verified canonical tree) of one step; ConfigError when the model, the seed or
        (given `tcfg`) the batch shape differ: the step is a position in the data stream."""
        meta = self._everywhere(self.read_meta, step)
        check_model(ModelConfig(**meta["model"]), model, str(self.path(step)))
        if seed is not None and meta["seed"] != seed:
            raise ConfigError(
                f"checkpoint {self.path(step)} was trained with seed {meta['seed']} but this run "
                f"uses seed {seed}; the data order would differ. Pass --seed {meta['seed']} or "
                f"use another --workdir"
            )
        saved = meta.get("train") if isinstance(meta.get("train"), dict) else {}
        for field in ("batch_size", "seq_len") if tcfg is not None else ():
            if field in saved and saved[field] != getattr(tcfg, field):
                raise ConfigError(
                    f"checkpoint {self.path(step)} was trained with --{field} {saved[field]} but "
                    f"this run uses {getattr(tcfg, field)}; its step would point elsewhere in the "
                    f"data. Pass --{field} {saved[field]} or use another --workdir"
                )
        tree = self._everywhere(self._read_arrays, step, target)
        bad = mismatches(FINGERPRINTS[meta["format"]](tree), meta["fingerprint"])
        if bad:
            raise CorruptCheckpoint(f"fingerprint mismatch in {len(bad)} arrays, e.g. {bad[0]}")
        return meta, tree

    def _read_arrays(self, step: int, target: dict) -> dict:
        """The step's arrays, each process reading the shards of `target`'s shardings that its
        devices hold."""
        try:
            return self.reader.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )["state"]
        except Exception as e:  # noqa: BLE001
            if _io_error(e):
                raise UnreadableCheckpoint(_reason(_io_error(e))) from e
            raise CorruptCheckpoint(f"arrays unreadable ({_reason(e)})") from e

    def _everywhere(self, read, *args):
        """read(*args) in this process; when it fails in any process every process raises
        (the same kind of failure), so that all go on together. Not a collective read-only."""
        code, error, found = 0, None, None
        try:
            found = read(*args)
        except CorruptCheckpoint as e:
            code, error = 1, e
        except UnreadableCheckpoint as e:
            code, error = 2, e
        agreed = code if self.read_only else agree_max(code)
        if agreed == code and error is not None:
            raise error
        if agreed == 2:
            raise UnreadableCheckpoint("unreadable in another process")
        if agreed == 1:
            raise CorruptCheckpoint("it failed to load in another process")
        return found

    def unreadable_error(self, step: int, reason: str) -> CheckpointIOError:
        return CheckpointIOError(
            f"cannot read checkpoint {self.path(step)} ({reason}); it was left untouched. Fix "
            f"its permissions or storage and rerun, or move it out of {self.directory} to "
            f"resume from an older checkpoint"
        )

    def try_step(self, restore_one, step: int):
        """(found, None) or (None, why) for one step, the same in every process unless
        read-only; CheckpointIOError when it cannot be read (in any process)."""
        found, error, code = None, None, 0
        try:
            found = restore_one(step)
        except CorruptCheckpoint as e:
            error, code = str(e), 1
        except UnreadableCheckpoint as e:
            error, code = str(e), 2
        if not self.read_only:
            code = agree_max(code)
        if code == 2 and not self.read_only:
            raise self.unreadable_error(step, error or "unreadable in another process")
        if code == 0:
            return found, None
        if code == 2:
            return None, f"left untouched ({error})"
        return None, error or "it failed to load or to verify in another process"

    def newest_good(self, restore_one):
        """restore_one(step) for the newest step where it succeeds (in every process, unless
        read-only); None when it fails on every step."""
        for step in reversed(self.steps()):
            found, error = self.try_step(restore_one, step)
            if error is None:
                return found
            kind = "unreadable" if error.startswith("left untouched") else "corrupt"
            print(f"warning: skipping {kind} checkpoint {self.path(step)}: {error}", flush=True)
        return None

    def pick(self, restore_one, step: int | None):
        """restore_one(step) of the given step (ConfigError when it is missing or fails), or of
        the newest step where it succeeds (None when none does)."""
        if step is None:
            return self.newest_good(restore_one)
        steps = self.steps()
        if step not in steps:
            raise ConfigError(
                f"no checkpoint of step {step} in {self.directory}; its steps are {steps}"
            )
        found, error = self.try_step(restore_one, step)
        if error is not None:
            raise ConfigError(f"checkpoint {self.path(step)} cannot be used: {error}")
        return found

    def move_aside(self, step: int) -> Path:
        """Moves a corrupt step to CKPT_DIR/corrupt/<step> (process 0; a collective)."""
        aside = self.directory / CORRUPT_DIR / str(step)
        n = 1
        while aside.exists():
            aside, n = self.directory / CORRUPT_DIR / f"{step}.{n}", n + 1
        _barrier(f"jaxpipe_move_aside_{step}")  # no process still lists (stats) the step
        if jax.process_index() == 0:
            aside.parent.mkdir(exist_ok=True)
            os.rename(self.path(step), aside)
        _barrier(f"jaxpipe_moved_aside_{step}")
        self.manager.reload()
        return aside

    def remove_unfinished(self) -> list[Path]:
        """Removes orbax's temporary directories of saves that never committed (process 0)."""
        found = [p for p in self.directory.iterdir() if TMP_MARK in p.name and p.is_dir()]
        _barrier("jaxpipe_remove_unfinished")
        if jax.process_index() == 0:
            for p in found:
                shutil.rmtree(p)
        _barrier("jaxpipe_removed_unfinished")
        return found

    def restore(self, trainer: Trainer, step: int | None = None) -> TrainState | None:
        """The newest verified checkpoint (or `step`) placed for `trainer`; None when none."""
        target = abstract_canonical(trainer.pipe.model, trainer.tx, canonical_shardings(trainer))
        tcfg = trainer.tcfg
        one = lambda s: self.restore_tree(s, target, trainer.pipe.model, tcfg.seed, tcfg)[1]
        tree = self.pick(one, step)
        if tree is None and self.steps():
            raise ConfigError(
                f"every checkpoint in {self.directory} is corrupt (steps {self.steps()}); "
                f"delete them or use another --workdir"
            )
        return None if tree is None else place_state(trainer, tree)

    def wait(self) -> bool:
        """Waits for the save in flight; False when a save failed."""
        if self.failure is None:
            try:
                self.manager.wait_until_finished()
            except Exception as e:  # noqa: BLE001
                self._failed(e)
        return self.failure is None

    def close(self) -> None:
        """Waits for the save in flight and closes; CheckpointIOError when a save failed (then
        orbax's threads may still wait on the failed save: exit with os._exit)."""
        if self.wait():
            self._close()
        else:
            raise self.save_error()

    def _close(self) -> None:
        self.manager.close()
        if self.reader is not self.manager:
            self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        elif self.wait():  # an error is on its way out already: do not replace it
            self._close()


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

    SIGINT or SIGTERM (caught while this runs, in the main thread) stops every process after
    the same step, saves a checkpoint there and raises `Interrupted`; a failed save stops every
    process with `CheckpointIOError`. Both leave orbax's threads of a failed save waiting: a
    script should end with `os._exit` after reporting it.
    """
    with Interrupts() as interrupts, Checkpoints(workdir, every, keep, async_save) as ckpts:
        if not resume and ckpts.steps():
            raise ConfigError(
                f"{ckpts.directory} already holds checkpoints {ckpts.steps()}; resume from them "
                f"(--resume), or use another --workdir"
            )
        unfinished = ckpts.remove_unfinished()
        if unfinished and jax.process_index() == 0:
            names = ", ".join(p.name for p in unfinished)
            print(f"removed unfinished checkpoint saves in {ckpts.directory}: {names}", flush=True)
        state = ckpts.restore(trainer) if resume else None
        step = 0 if state is None else int(state.step)
        if state is not None and jax.process_index() == 0:
            print(f"resuming from step {step} ({ckpts.path(step)})", flush=True)
        if state is None and init_params is not None:
            state = trainer.init_state(init_params)  # a fresh run from given parameters
        for newer in [s for s in ckpts.steps() if s > step]:  # skipped as corrupt
            aside = ckpts.move_aside(newer)
            if jax.process_index() == 0:
                print(f"moved corrupt checkpoint {ckpts.path(newer)} to {aside}", flush=True)
        agreement = Agreement()

        def hook(s):
            nonlocal step
            step += 1
            if step % every == 0 or step == trainer.tcfg.steps:
                ckpts.save(trainer, s, force=True)
            if on_step is not None:
                on_step(s)

        def poll(s):
            return agreement(SAVE_FAILED if not ckpts.check() else interrupts.signum)

        try:
            return train(trainer, data, workdir, state, on_step=hook, poll=poll)
        except NonFiniteError as e:
            ckpts.wait()
            steps = ckpts.steps()
            where = f"{ckpts.path(steps[-1])}" if steps else "none saved yet"
            raise NonFiniteError(f"{e} Last good checkpoint: {where}.") from None
        except StopTraining as stop:
            if stop.code == SAVE_FAILED:
                raise ckpts.save_error() from None
            raise _interrupted(ckpts, trainer, stop) from None


def _interrupted(ckpts: Checkpoints, trainer: Trainer, stop: StopTraining) -> Exception:
    """Saves the state every process stopped at; the exception that reports it."""
    step, name = int(stop.state.step), signal_name(stop.code)
    ckpts.save(trainer, stop.state, force=True)
    if agree_max(0 if ckpts.wait() else SAVE_FAILED) == SAVE_FAILED:
        return ckpts.save_error()
    _barrier("jaxpipe_interrupted")  # every process stays until the checkpoint is committed
    steps = ckpts.committed_on_disk()
    if step in steps:
        saved = f"saved checkpoint {ckpts.path(step)}"
    else:  # a step with non-finite trouble pending is never saved
        saved = "not saved (non-finite steps pending); newest checkpoint " + (
            str(ckpts.path(steps[-1])) if steps else "none"
        )
    return Interrupted(
        f"stopped by {name} after step {step}: {saved}; rerun the same command to resume",
        stop.code,
        step,
    )


def load_params(workdir: str | Path, step: int | None = None, device=None):
    """(ModelConfig, canonical params) of the newest good checkpoint, for the reference model.

    The whole saved state is read so that its fingerprint can be verified; only params are
    returned, on one device of this process (default: its first). It reads in this process
    alone, so with several processes any of them may call it (a checkpoint saved by several
    processes loads in one).
    """
    try:
        ckpts = Checkpoints(workdir, read_only=True)
    except CheckpointIOError as e:  # nothing to read: a bad --workdir for a reader
        raise ConfigError(str(e)) from e
    sharding = SingleDeviceSharding(device or jax.local_devices()[0])

    def one(s):
        meta = ckpts.read_meta(s)
        model = ModelConfig(**meta["model"])
        tx = make_optimizer(TrainConfig(**meta["train"]))
        target = abstract_canonical(model, tx, sharding)
        return model, ckpts.restore_tree(s, target, model, None)[1]["params"]

    try:
        try:
            steps = ckpts.steps()
        except OSError as e:
            raise ConfigError(
                f"cannot list the checkpoints in {ckpts.directory} ({_reason(e)}); make it "
                f"readable or use another --workdir"
            ) from e
        if not steps:
            raise ConfigError(
                f"no checkpoint in {ckpts.directory}; train with --workdir {workdir} first"
            )
        found = ckpts.pick(one, step)
        if found is None:
            raise ConfigError(
                f"every checkpoint in {ckpts.directory} is corrupt or unreadable (steps "
                f"{steps}; see the warnings above)"
            )
        return found
    finally:
        ckpts.close()
