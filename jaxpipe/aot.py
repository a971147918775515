"""Ahead-of-time compilation of the real training step for a device topology, nothing allocated.

`compile_step` builds the `Trainer` (the jitted forward + backward + AdamW step running the
pipeline executor) on the devices of a topology, lowers it from abstract shapes (the train
state from `jax.eval_shape` with the trainer's own shardings attached, the token batch with the
pipeline's batch sharding) and compiles it. Nothing runs and no array is created, so a
70B-parameter step for a TPU pod compiles on a CPU host. The compiler's per-device memory
(arguments, outputs, temporaries, aliased) says whether the step fits, next to the planner's
prediction for the same configuration.

Topologies: `<generation>:<chips>` such as `v5p:4x4x4` (64 chips) compile for TPU through
libtpu's compile-only devices (`pip install 'jaxpipe[tpu]'`; no TPU needed); `cpu:N` compiles
for the first N of this process's CPU devices (force them before JAX starts:
`topology.prepare_host`, or `jaxpipe.mesh.force_cpu_devices`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time

import jax
import jax.numpy as jnp

from jaxpipe.attention import compiling_for
from jaxpipe.config import ConfigError, ModelConfig, PipelineConfig
from jaxpipe.costs import DeviceProfile
from jaxpipe.hlo import (
    SIZE,
    dump_options,
    largest_buffers,
    optimized_hlo,
    permute_overlap,
    size_bytes,
)
from jaxpipe.partition import make_plan
from jaxpipe.report import Plan
from jaxpipe.topology import Topology, first_line, get_topology, profile_name, resolve
from jaxpipe.train import TrainConfig, Trainer


def abstract_inputs(trainer: Trainer, batch_size: int, seq_len: int):
    """(train state, token batch) as ShapeDtypeStructs carrying the trainer's shardings."""
    state = trainer.abstract_state()
    batch = jax.ShapeDtypeStruct(
        (batch_size, seq_len + 1), jnp.int32, sharding=trainer.pipe.batch_sharding()
    )
    return state, batch


_OOM_PATTERNS = (
    ("HLO temporaries", re.compile(rf"temporaries \({SIZE}\) exceeds available HBM \({SIZE}\)")),
    ("total", re.compile(rf"Used {SIZE} of {SIZE} hbm")),
)


def parse_oom(message: str) -> dict | None:
    """A compiler out-of-memory message -> {"what", "required", "available" (bytes),
    "message"}; None if `message` is not one."""
    if "RESOURCE_EXHAUSTED" not in message and "HbmOom" not in message:
        return None
    oom = {"what": None, "required": None, "available": None, "message": first_line(message)}
    for what, pattern in _OOM_PATTERNS:
        m = pattern.search(message)
        if m:
            num = [size_bytes(m.group(i), m.group(i + 1)) for i in (1, 3)]
            oom.update(what=what, required=num[0], available=num[1])
            break
    return oom


def _compile(lowered, platform: str):
    """(compiled or None, oom or None, optimised HLO text or None, largest buffers or None).

    A TPU compile dumps its HLO and memory report to a temporary directory and they are read
    from there: libtpu's HLO can be newer than what jaxlib parses back (`as_text()` then fails
    a RET_CHECK), and the dump is written even when the program runs out of memory. The CPU
    compiler's own HLO prints directly."""
    with tempfile.TemporaryDirectory(prefix="jaxpipe-aot-") as dump:
        options = dump_options(dump) if platform == "tpu" else None
        try:
            compiled, oom = lowered.compile(compiler_options=options), None
        except jax.errors.JaxRuntimeError as e:
            oom = parse_oom(str(e))
            if oom is None:
                raise
            compiled = None
        if platform == "tpu":
            return compiled, oom, optimized_hlo(dump), largest_buffers(dump)
    return compiled, oom, None if compiled is None else compiled.as_text(), None


MEMORY_FIELDS = ("arguments", "outputs", "aliased", "temporaries", "code", "total")


@dataclasses.dataclass(frozen=True)
class AotReport:
    """What the compiler says about one training step on one topology (bytes per device).

    memory: arguments, outputs, aliased (outputs reusing donated argument buffers),
    temporaries, code (the program) and total = arguments + outputs - aliased + temporaries +
    code; None when the compile ran out of memory, then `oom` holds the compiler's figures
    (what it measured, required, available). flops: XLA's cost analysis of the program, per
    device; it counts a loop body once, so the executor's tick loop is under-counted.
    largest_buffers: the biggest allocations of the compiler's memory-usage report (TPU only),
    with the shapes of the values sharing each; there even when the step does not fit.
    permute_overlap: per ppermute start/done pair, the compute and matmul instructions the
    scheduler put between them (`hlo.permute_overlap`); None when the HLO cannot be printed.
    """

    model: str
    topology: str
    device_kind: str
    num_devices: int
    mesh: tuple[int, int, int]  # data, pipe, tensor
    schedule: str
    num_microbatches: int
    remat: str
    batch_size: int
    seq_len: int
    dtype: str
    attention: str  # the model's attention kernel (ModelConfig.attention)
    layout: tuple[int, ...]
    memory: dict | None
    oom: dict | None
    hbm_bytes: float
    hbm_source: str
    fits: bool
    predicted_bytes: float  # the planner's memory estimate per device (`device_memory`)
    flops: float | None
    largest_buffers: list | None
    permute_overlap: list | None
    compile_s: float

    @property
    def ratio(self) -> float | None:
        """Compiled total / the planner's prediction."""
        return None if self.memory is None else self.memory["total"] / self.predicted_bytes

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mesh": list(self.mesh), "layout": list(self.layout),
                "ratio": self.ratio}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        d, p, t = self.mesh
        rows = [
            f"aot: {self.model} on {self.topology} ({self.num_devices} x {self.device_kind}), "
            f"data {d} x pipe {p} x tensor {t}, schedule {self.schedule}, "
            f"M={self.num_microbatches}, remat {self.remat}, batch {self.batch_size} x seq "
            f"{self.seq_len}, {self.dtype}, attention {self.attention}",
            "per device (compiler):",
        ]
        if self.memory is not None:
            rows += [f"  {k:<13} {size_text(self.memory[k]):>12}" for k in MEMORY_FIELDS]
        else:
            o = self.oom
            need = "?" if o["required"] is None else size_text(o["required"])
            have = "?" if o["available"] is None else size_text(o["available"])
            rows.append(f"  out of memory: {o['what'] or 'memory'} {need} > available {have}")
        if self.largest_buffers:
            rows.append("largest buffers (compiler's memory-usage report):")
            rows += [f"  {size_text(b['bytes']):>12}  {b['shapes']}" for b in self.largest_buffers]
        rows += [
            f"HBM per device {size_text(self.hbm_bytes)} ({self.hbm_source})",
            f"fits: {'yes' if self.fits else 'no'}",
            f"planner predicted {size_text(self.predicted_bytes)} per device"
            + ("" if self.ratio is None else f"; compiled / predicted {self.ratio:.2f}"),
        ]
        if self.flops is not None:
            rows.append(f"XLA flops per device {self.flops:.3e} (loop bodies counted once)")
        if self.permute_overlap is None:
            rows.append("ppermute overlap: HLO not readable")
        elif not self.permute_overlap:
            rows.append("ppermute overlap: none (no asynchronous collective-permute)")
        else:
            compute = [o["compute"] for o in self.permute_overlap]
            matmul = [o["matmul"] for o in self.permute_overlap]
            rows.append(
                f"ppermute overlap: compute ops between start and done {compute}, of which "
                f"matmuls {matmul}"
            )
        rows.append(f"compile {self.compile_s:.1f} s")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def size_text(n: float) -> str:
    """Bytes in the largest unit (GiB, MiB, KiB) that keeps them >= 1."""
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n:.0f} B"


def compile_step(
    model: ModelConfig,
    pcfg: PipelineConfig,
    *,
    batch_size: int,
    seq_len: int,
    topology: str,
    method: str = "uniform",
    device: str | DeviceProfile | None = None,
) -> AotReport:
    """Compiles the training step of `model` pipelined by `pcfg` for `topology`, abstractly.

    Args:
      model, pcfg: the model (its `dtype` is the compute dtype) and the pipeline shape; the
        mesh product data x pipe x tensor must equal the topology's device count.
      batch_size, seq_len: the global batch and the sequence length of a step.
      topology: `v5p:4x4x4`-style TPU slice (needs libtpu) or `cpu:N`.
      method: the planner's partition method; its layout is the one compiled.
      device: the planner's device profile (default: the topology's, see `profile_name`).
    Returns:
      An `AotReport`. A compile that runs out of device memory is reported (fits False, the
      compiler's figures in `oom`), not raised.
    """
    topo = get_topology(topology)
    _check_devices(pcfg, topology, len(topo.devices))
    inside = pcfg.embed_head == "inside"
    with compiling_for(topo.platform):  # e.g. attention="splash" traces for a TPU topology
        plan = make_plan(
            model, pcfg, method, batch_size=batch_size, seq_len=seq_len,
            device=profile_name(topology) if device is None else device,
            embed_in_first=inside, head_in_last=inside,
            compile_on=topo.devices[0] if topo.platform == "tpu" else None,
        )
    return compile_plan(plan, batch_size=batch_size, seq_len=seq_len, topology=topo)


def _check_devices(pcfg: PipelineConfig, topology: str, count: int) -> None:
    if pcfg.num_devices != count:
        raise ConfigError(
            f"data x pipe x tensor = {pcfg.data_parallel} x {pcfg.num_stages} x "
            f"{pcfg.tensor_parallel} = {pcfg.num_devices} devices, but topology {topology} has "
            f"{count}; make the product {count}"
        )


def compile_plan(plan: Plan, *, batch_size: int, seq_len: int,
                 topology: str | Topology) -> AotReport:
    """Compiles the training step of `plan` (its model, pipeline shape and layout) for
    `topology` (a topology string, or a `Topology` such as `topology.present()`, the devices
    this program runs on), abstractly; the report's prediction is the plan's own memory per
    device."""
    model, pcfg = plan.model_cfg, plan.pipe_cfg
    topo = resolve(topology)
    topology = topo.name
    _check_devices(pcfg, topology, len(topo.devices))
    with compiling_for(topo.platform):
        tcfg = TrainConfig(batch_size=batch_size, seq_len=seq_len)
        trainer = Trainer.create(model, pcfg, tcfg, layout=plan.layout, devices=topo.devices)
        state, batch = abstract_inputs(trainer, batch_size, seq_len)
        t0 = time.perf_counter()
        lowered = trainer.step_fn.lower(state, batch)
    compiled, oom, text, largest = _compile(lowered, topo.platform)
    compile_s = time.perf_counter() - t0
    memory = flops = None
    hbm, hbm_source = topo.hbm_bytes, topo.hbm_source
    if compiled is not None:
        m = compiled.memory_analysis()
        memory = {
            "arguments": m.argument_size_in_bytes,
            "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes,
            "temporaries": m.temp_size_in_bytes,
            "code": m.generated_code_size_in_bytes,
        }
        memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                           + memory["temporaries"] + memory["code"])
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost["flops"]) if cost and "flops" in cost else None
    elif oom["available"] is not None:
        hbm, hbm_source = oom["available"], "compiler"
    fits = memory is not None and (topo.platform == "tpu" or memory["total"] <= hbm)
    return AotReport(
        model=model.name,
        topology=topology,
        device_kind=topo.devices[0].device_kind,
        num_devices=len(topo.devices),
        mesh=(pcfg.data_parallel, pcfg.num_stages, pcfg.tensor_parallel),
        schedule=pcfg.schedule,
        num_microbatches=pcfg.num_microbatches,
        remat=pcfg.remat,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=model.dtype,
        attention=model.attention,
        layout=tuple(plan.layout.layer_counts),
        memory=memory,
        oom=oom,
        hbm_bytes=float(hbm),
        hbm_source=hbm_source,
        fits=fits,
        predicted_bytes=max(st.memory_bytes for st in plan.stages),
        flops=flops,
        largest_buffers=largest,
        permute_overlap=None if text is None else permute_overlap(text),
        compile_s=compile_s,
    )
