"""Trains a byte-level language model with its blocks pipelined over a `data x pipe` mesh.

Run (no flags: the `small` GPT-2-style model, 4 stages over 4 forced CPU devices, 8
micro-batches, on the Python standard library's own source text):

    python experiments/train_lm.py

Expect on a 2-core CPU (measured): about 4 minutes (233 s of training after a 7 s first step
that includes compilation, ~3,200 tok/s); the loss falls from 5.44 to an eval loss of 2.38
nats/byte, well under the data's unigram entropy (3.26 nats).

Other shapes, e.g. circular GPipe over 4 stages with 2 repeats, data parallel 2:

    python experiments/train_lm.py --num_stages 4 --num_repeats 2 --schedule circular \
        --data_parallel 2 --workdir runs/circ

Or let the autotuner choose the shape for the devices present (here 4 forced CPU devices; it
prints its table of candidates first, then trains the best):

    python experiments/train_lm.py --auto --devices 4 --workdir runs/auto

With --auto_time 3 it first runs the first 3 candidates' steps on those devices and trains the
fastest measured.

Writes WORKDIR/config.json, metrics.jsonl (one JSON row per logged step), summary.json,
loss.png and WORKDIR/checkpoints/<step> every --checkpoint_every steps (the last
--keep_checkpoints kept). Re-running with the same --workdir resumes from the newest complete
checkpoint, at any pipeline shape; its losses equal those of an uninterrupted run. With
several processes (experiments/launch_local.py) process 0 writes these files, all processes
save and restore the checkpoints together, and a run resumes with any number of processes.
The workdir is checked before any device set-up (a file, an unwritable path or a directory of
unrelated files is refused) and locked for the whole run (WORKDIR/.jaxpipe.lock, held by process
0): a second run on it stops at once, naming the first one's pid and host.

A bad flag prints `error: <what to change>` and exits with status 2; training stopped by
non-finite losses prints `error: ...` and exits with status 3; a checkpoint that cannot be read
(permissions, I/O errors; it is left untouched) or a save that fails prints `error: ...` naming
the path and the reason and exits with status 4, the checkpoints saved before it intact.
SIGINT or SIGTERM during training stops every process after the same step, saves a checkpoint
there, prints one line (`stopped by SIGTERM after step 37: saved checkpoint ...`) and exits with
status 130 (SIGINT) or 143 (SIGTERM); rerunning the command resumes from it exactly. SIGINT
before training starts prints one line and exits with status 130, saving nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys

from absl import flags, logging

_F = flags.FLAGS
flags.DEFINE_string("model", "small", "Model preset (see jaxpipe.config.PRESETS).")
flags.DEFINE_integer("num_layers", None, "Override the preset's number of layers.")
flags.DEFINE_integer("vocab_size", None, "Override the preset's vocabulary size.")
flags.DEFINE_integer("num_stages", 4, "Pipeline stages (size of the `pipe` mesh axis).")
flags.DEFINE_integer("num_microbatches", 8, "Micro-batches per step.")
flags.DEFINE_integer("num_repeats", 1, "Virtual stages per device (circular schedule).")
flags.DEFINE_string(
    "schedule", "gpipe", "gpipe | circular | 1f1b | interleaved_1f1b | zb_h1 | zbv (num_repeats 2)."
)
flags.DEFINE_integer("data_parallel", 1, "Size of the `data` mesh axis.")
flags.DEFINE_integer("tensor_parallel", 1, "Size of the `tensor` mesh axis.")
flags.DEFINE_integer("batch_size", 16, "Global batch size (sequences per step).")
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
flags.DEFINE_integer("steps", 300, "Training steps.")
flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate (warmup, then cosine decay).")
flags.DEFINE_integer("warmup_steps", 20, "Linear warmup steps.")
flags.DEFINE_string("remat", "none", "none | layer | stage.")
flags.DEFINE_string("attention", "xla", "Attention kernel: xla (anywhere) | cudnn (NVIDIA "
                    "GPUs) | splash (the Pallas TPU kernel; seq_len a multiple of 128).")
flags.DEFINE_string("partition", "uniform", "uniform | cost | memory | profile (stage sizes).")
flags.DEFINE_string("device_profile", "cpu", "Device profile the partitioner costs layers on.")
flags.DEFINE_string("embed_head", "outside", "outside | inside (embedding in the first stage, "
                    "head + loss in the last).")
flags.DEFINE_bool("auto", False, "Choose the mesh, schedule, repeats, micro-batches, remat, "
                  "embedding placement and layer split for the devices present "
                  "(jaxpipe.autotune; on accelerators the first candidate whose step compiles "
                  "within their memory, jaxpipe.verify); the shape flags are then ignored.")
flags.DEFINE_integer("auto_time", 0, "With --auto: run the first N candidates' steps on the "
                     "devices present and train the fastest measured (jaxpipe.trial); 0: train "
                     "the predicted best.")
flags.DEFINE_bool("check_balance", False, "Measure each stage's time, compare with the plan, "
                  "warn above 1.2x imbalance and print the suggested re-partition.")
flags.DEFINE_string("boundary_dtype", None, "dtype of activations sent between stages.")
flags.DEFINE_bool("zero1", False, "Split the AdamW moments over `data` (ZeRO-1).")
flags.DEFINE_bool("fsdp", False, "Also split block parameters over `data`; gathered once per "
                  "step per stage.")
flags.DEFINE_bool("overlap_sends", False, "gpipe/circular: send each stage's output during the "
                  "next tick's compute (S - 1 more ticks of fill and drain).")
flags.DEFINE_string("workdir", "runs/train_lm", "Where config, metrics and plots go.")
flags.DEFINE_string("data", None, "Text file/directory or .npy/.bin token ids (default: stdlib).")
flags.DEFINE_integer("seed", 0, "Seed for parameters and data order.")
flags.DEFINE_integer("log_every", 10, "Log every N steps.")
flags.DEFINE_integer(
    "devices", None, "CPU devices to force in this process (default: mesh size / processes)."
)
flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs, or "
                    "'auto' on SLURM / TPU pods (env JAXPIPE_COORDINATOR).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run "
                     "(env JAXPIPE_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (env JAXPIPE_PROCESS_ID).")
flags.DEFINE_integer("checkpoint_every", 100, "Save a checkpoint every N steps (and at the end).")
flags.DEFINE_integer("keep_checkpoints", 3, "Keep the newest K checkpoints.")
flags.DEFINE_bool("resume", True, "Resume from WORKDIR/checkpoints if any (--noresume: refuse).")
flags.DEFINE_integer("max_bad_steps", 5, "Consecutive non-finite steps skipped before stopping.")
flags.DEFINE_bool("stop_on_nonfinite", False, "Stop at the first non-finite step.")


MAX_CPU_DEVICES = 1024  # forced CPU devices per process (XLA's CPU client fails far above)


def main(argv, initial=None, load=None):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    # A failed save is reported in one `error:` line; orbax's threads also log its traceback.
    logging.get_absl_logger().addFilter(
        lambda r: not (r.exc_info and f"{os.sep}orbax{os.sep}" in r.pathname)
    )
    from jaxpipe.checkpoint import CheckpointIOError, Interrupted
    from jaxpipe.config import ConfigError
    from jaxpipe.interrupt import exit_code
    from jaxpipe.train import NonFiniteError

    try:
        run(argv, initial, load)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except CheckpointIOError as e:
        _exit_now(f"error: {e}", 4)  # orbax's threads of a failed save would block exit
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(exit_code(e.signum))
    except KeyboardInterrupt:
        _exit_now("interrupted (SIGINT) before training started; nothing was saved", 130)


def _exit_now(message: str, code: int) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def run(argv, initial=None, load=None):
    """The training job; `initial()`, when given, returns (ModelConfig, canonical params) to
    start from instead of the --model preset and the seed; `load(path)`, when given, reads
    --data instead of `load_data`. The workdir is locked throughout."""
    with contextlib.ExitStack() as held:
        _run(argv, initial, load, held)


def _run(argv, initial, load, held):
    if len(argv) > 1:
        from jaxpipe.config import ConfigError

        raise ConfigError(f"unexpected arguments {argv[1:]}; flags are spelled --name=value")
    import jax

    from jaxpipe.mesh import initialize_distributed
    from jaxpipe.workdir import check_same_model, check_workdir, hold_workdir, write_text

    workdir = check_workdir(_F.workdir)  # before any device set-up or planning

    from jaxpipe.config import ConfigError, PipelineConfig

    pcfg = PipelineConfig(  # checked before any device is set up
        num_stages=_F.num_stages,
        num_microbatches=_F.num_microbatches,
        num_repeats=_F.num_repeats,
        schedule=_F.schedule,
        remat=_F.remat,
        boundary_dtype=_F.boundary_dtype,
        data_parallel=_F.data_parallel,
        tensor_parallel=_F.tensor_parallel,
        embed_head=_F.embed_head,
        zero1=_F.zero1,
        fsdp=_F.fsdp,
        overlap_sends=_F.overlap_sends,
    )
    if _F.devices is not None and _F.devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {_F.devices}; or leave it out")
    if _F.auto_time < 0 or (_F.auto_time and not _F.auto):
        raise ConfigError(f"--auto_time times the autotuner's first candidates: a count >= 1 "
                          f"with --auto (0: off), got {_F.auto_time}"
                          + ("" if _F.auto else " without --auto"))
    num_processes = _F.num_processes or int(os.environ.get("JAXPIPE_NUM_PROCESSES") or 1)
    n_dev = _F.devices or max(pcfg.num_devices // num_processes, 1)
    if jax.config.jax_platforms == "cpu":
        if n_dev > MAX_CPU_DEVICES:
            raise ConfigError(
                f"this run would force {n_dev:,} CPU devices (data x pipe x tensor = "
                f"{pcfg.num_devices:,} over {num_processes} process(es)); at most "
                f"{MAX_CPU_DEVICES} per process are supported: use fewer stages, data or tensor"
            )
        jax.config.update("jax_num_cpu_devices", n_dev)
    initialize_distributed(_F.coordinator, _F.num_processes, _F.process_id)

    from jaxpipe import TrainConfig, Trainer, get_preset
    from jaxpipe.attention import check_kernel
    from jaxpipe.checkpoint import train_resumable
    from jaxpipe.data import load_data
    from jaxpipe.partition import make_plan
    from jaxpipe.tokenizer import check_same_tokenizer, save_tokenizer
    from jaxpipe.verify import choose_compiled

    if initial is None:
        model = get_preset(_F.model, num_layers=_F.num_layers, vocab_size=_F.vocab_size)
        init_params = None
    else:
        model, init_params = initial()
    model = model.replace(attention=_F.attention)
    tcfg = TrainConfig(
        steps=_F.steps,
        batch_size=_F.batch_size,
        seq_len=_F.seq_len,
        learning_rate=_F.learning_rate,
        warmup_steps=_F.warmup_steps,
        seed=_F.seed,
        log_every=_F.log_every,
        max_bad_steps=0 if _F.stop_on_nonfinite else _F.max_bad_steps,
    )
    # Configs are checked before the workdir is touched; then process 0 locks it (all agree).
    check_kernel(model, tcfg.seq_len)
    held.enter_context(hold_workdir(workdir))
    check_same_model(workdir, model)
    print(f"process {jax.process_index()}/{jax.process_count()} devices: {jax.devices()}")
    data = (load or load_data)(_F.data)
    data.check(tcfg.seq_len)
    check_same_tokenizer(workdir, data.tokenizer)
    if _F.auto:
        found, best = choose_compiled(model, pcfg, device=_F.device_profile,
                                      global_batch=tcfg.batch_size, seq_len=tcfg.seq_len,
                                      time=_F.auto_time)
        print(found.table())
        plan, pcfg = best.plan, best.pipe_cfg
    else:
        inside = pcfg.embed_head == "inside"
        plan = make_plan(model, pcfg, _F.partition, batch_size=tcfg.batch_size,
                         seq_len=tcfg.seq_len, device=_F.device_profile, embed_in_first=inside,
                         head_in_last=inside)
    print(plan.table())
    if _F.check_balance:
        _check_balance(model, pcfg, tcfg, plan)
    trainer = Trainer.create(model, pcfg, tcfg, layout=plan.layout)
    if jax.process_index() == 0:  # one process writes the workdir's files
        write_text(workdir / "plan.json", plan.to_json())
        write_text(
            workdir / "config.json",
            json.dumps(
                {
                    "model": dataclasses.asdict(model),
                    "pipeline": dataclasses.asdict(pcfg),
                    "train": dataclasses.asdict(tcfg),
                    "data": data.source,
                    "tokenizer": save_tokenizer(workdir, data.tokenizer),
                    "layout": trainer.pipe.layout.describe(),
                },
                indent=2,
            )
        )
    print(
        f"model {model.name}: {model.num_params() / 1e6:.2f}M params, {model.num_layers} layers; "
        f"stages: {trainer.pipe.layout.describe()}; schedule {pcfg.schedule} "
        f"(bubble {trainer.pipe.table.bubble_fraction():.1%}); data {data.source} "
        f"({len(data.tokens):,} tokens, unigram entropy {data.unigram_entropy():.3f} nats)"
    )
    summary = train_resumable(trainer, data, workdir, every=_F.checkpoint_every,
                              keep=_F.keep_checkpoints, resume=_F.resume,
                              init_params=init_params)
    if not summary["history"]:
        print(
            f"done: the checkpoint is at step {summary['start_step']}, at or past --steps "
            f"{summary['steps']}; nothing was trained (eval {summary['eval_loss']:.3f})"
        )
        return
    print(
        f"done: {summary['steps']} steps in {summary['wall_s']:.0f}s; loss "
        f"{summary['first_loss']:.3f} -> {summary['final_loss']:.3f} "
        f"(eval {summary['eval_loss']:.3f}, unigram entropy "
        f"{summary['unigram_entropy']:.3f}); {summary['tokens_per_s']:,.0f} tok/s; "
        f"outputs in {workdir}/"
    )


def _check_balance(model, pcfg, tcfg, plan):
    from jaxpipe.balance import check_balance
    from jaxpipe.measure import measure_stage_times

    measured = measure_stage_times(model, pcfg, plan.layout, batch_size=tcfg.batch_size,
                                   seq_len=tcfg.seq_len)
    report = check_balance(plan, measured)
    for s, (p, m) in enumerate(zip(report.predicted_s, report.measured_s, strict=True)):
        print(f"stage {s}: predicted {p * 1e3:8.2f} ms  measured {m * 1e3:8.2f} ms")
    print(f"slowest / fastest stage: {report.ratio:.2f}; max prediction error "
          f"{report.max_error:.0%}")
    if report.suggestion is not None and report.suggestion.layout == plan.layout:
        print(f"stages are imbalanced ({report.ratio:.2f}x > 1.2x) but no contiguous split of "
              f"the measured layer times does better than {plan.layout_string()}")
    elif report.suggestion is not None:
        print(f"warning: stages are imbalanced ({report.ratio:.2f}x > 1.2x); suggested "
              f"re-partition: {report.suggestion.layout_string()} (use --partition profile)")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jaxpipe imports jax
    from jaxpipe.cli import run_app

    run_app(main)
