"""Per-layer costs from XLA and device profiles: what one block, the embedding and the head cost.

Each kind of layer is lowered and compiled once, forward + backward, at the per-device
micro-batch shape from `jax.ShapeDtypeStruct` inputs (nothing is allocated, so 175B-parameter
shapes are fine). FLOPs, bytes accessed and transcendentals come from
`compiled.cost_analysis()`, argument and temp bytes from `compiled.memory_analysis()`. A scanned
stack is never costed: XLA ignores loop trip counts.

Per-device accounting: the micro-batch is divided by `data_parallel`; tensor parallelism divides
the block's and head's FLOPs, bytes, parameters and activations by `tensor_parallel`
(an analytic Megatron-style division; the costed program itself is unsharded).
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe import model as M
from jaxpipe.agree import process0_floats
from jaxpipe.backsplit import BackwardSplit
from jaxpipe.config import ConfigError, ModelConfig, PipelineConfig
from jaxpipe.links import Links
from jaxpipe.programs import layer_programs

try:  # residual sizes of a function's backward pass (private API)
    from jax._src.ad_checkpoint import saved_residuals
except ImportError:  # pragma: no cover - private API moved
    saved_residuals = None

GB = 1e9
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class StepFit:
    """Costs of a shared host fitted to its training steps (`autotune.fit_executor`) where they
    differ by how the mesh is split; `costmodel` reads them. With all `devices` on `data`,
    every device runs the whole model at once, with no collective until the gradients' and
    a whole model's working set: `data_concurrency` devices run at full speed at once (the
    profile's `concurrency` holds with every device on `pipe`). The recompute cost
    (a block's time under remat over its time without) on `stages` stages: `remat_staged` with
    fused backward ops, `remat_split` in split tables (zero-bubble B and W), where B recomputes
    the forward and still hands W the matmul inputs, so recomputing saves less residual
    traffic (the profile's `remat_cost` holds on one stage); `remat_alone` on `stages` stages
    with one micro-batch, one stage busy at a time, where recomputing saves the least (None:
    `remat_staged`). `split_cost`: a block's time in a split table over its time with fused
    backward ops (B writes the output cotangents W reads back: on a CPU those bytes cost about
    what the matmuls do). With the model split over `tensor` ranks: `tensor_cost`, a block's
    time (its share of the work and its all-reduces) over the model's figure for it, and
    `remat_tensor`, its time under remat over the model's figure for that relative to
    `tensor_cost` (on a CPU recomputing gains more there: each rank keeps the replicated
    [b, T, D] residuals of its larger micro-batch); 1 with `tensor` = 1."""

    devices: int
    stages: int
    remat_staged: float
    remat_split: float
    data_concurrency: float | None = None
    remat_alone: float | None = None
    split_cost: float = 1.0
    tensor: int = 1
    tensor_cost: float = 1.0
    remat_tensor: float = 1.0


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Peak dense bf16 FLOP/s, HBM bandwidth (B/s) and capacity (bytes), and the links.

    flops_efficiency: the share of the peak that large matmuls achieve (compute time is
    FLOPs / (peak x efficiency)). concurrency: how many devices' programs run at full speed at
    once; None when every device is its own chip, a number when devices share a host's cores
    (forced CPU devices), so a tick's busy ops share the cores. remat_cost: a block's forward
    + backward time with its forward recomputed over its time without; None: by FLOPs (4/3).
    Measured on a CPU, where recomputing can cost less than writing and reading the residuals.
    fit: what a shared host's training steps add to these by the mesh's split (`StepFit`).
    """

    name: str
    peak_flops: float
    hbm_bandwidth: float
    hbm_bytes: float
    links: Links
    head_flops: float | None = None  # measured CPU only: FLOP/s at the vocab projection's shape
    flops_efficiency: float = 1.0
    concurrency: float | None = None
    remat_cost: float | None = None  # measured CPU only: see `CostModel.from_costs`
    fit: StepFit | None = None  # fitted CPU only

    def roofline(self, flops: float, bytes_accessed: float, head: bool = False) -> float:
        peak = self.head_flops if head and self.head_flops else self.peak_flops
        return max(flops / (peak * self.flops_efficiency), bytes_accessed / self.hbm_bandwidth)

    def with_devices_per_node(self, n: int | None) -> DeviceProfile:
        """The same device in nodes of `n` (None: the profile's own figure)."""
        if n is None:
            return self
        return dataclasses.replace(self, links=self.links.replace(devices_per_node=n))


def _gpu_links(nvlink: float, network: float) -> Links:
    """8 GPUs a node, NVLink inside, one network adapter a GPU across nodes (per direction)."""
    return Links(nvlink, network, 5e-6, 10e-6, devices_per_node=8, efficiency=0.8)


def _tpu_links(ici: float, dcn: float, pod: int) -> Links:
    """ICI (one neighbour link) within a pod, a chip's share of its host's DCN across pods."""
    return Links(ici, dcn, 5e-6, 20e-6, devices_per_node=pod, efficiency=0.8)


# Public spec-sheet numbers. TPU link = per-chip ICI bandwidth / number of ICI links (one
# neighbour link); GPU link = NVLink bandwidth per direction; across nodes one 200 Gb/s (A100,
# HDR) or 400 Gb/s (H100/H200, NDR) InfiniBand adapter per GPU. The A100's matmul efficiency
# is fitted to one published run (README, "Anchors"); the others keep the full peak.
A100_FLOPS_EFFICIENCY = 0.84
PROFILES: dict[str, DeviceProfile] = {
    "tpu-v4": DeviceProfile(
        "tpu-v4", 275e12, 1200 * GB, 32 * GiB, _tpu_links(50 * GB, 6.25 * GB, 4096)
    ),
    "tpu-v5e": DeviceProfile(
        "tpu-v5e", 197e12, 819 * GB, 16 * GiB, _tpu_links(50 * GB, 6.25 * GB, 256)
    ),
    "tpu-v5p": DeviceProfile(
        "tpu-v5p", 459e12, 2765 * GB, 95 * GiB, _tpu_links(100 * GB, 12.5 * GB, 8960)
    ),
    "tpu-v6e": DeviceProfile(
        "tpu-v6e", 918e12, 1640 * GB, 32 * GiB, _tpu_links(100 * GB, 12.5 * GB, 256)
    ),
    "a100-80gb": DeviceProfile(
        "a100-80gb", 312e12, 2039 * GB, 80 * GB, _gpu_links(300 * GB, 25 * GB),
        flops_efficiency=A100_FLOPS_EFFICIENCY,
    ),
    "h100": DeviceProfile("h100", 989e12, 3350 * GB, 80 * GB, _gpu_links(450 * GB, 50 * GB)),
    "h200": DeviceProfile("h200", 989e12, 4800 * GB, 141 * GB, _gpu_links(450 * GB, 50 * GB)),
}
DEVICES = tuple(PROFILES) + ("cpu",)

_CPU_PROFILE: dict[tuple, DeviceProfile] = {}
# (model, seq_len) -> `_shared_links`
_SHARED: dict = {}


def best_times(calls: dict, reps: int = 5, min_seconds: float = 0.05) -> dict:
    """{name: (fn, args)} -> {name: seconds per call}: the best of `reps` timed samples.

    Calls are timed round-robin, so every one of them sees the same machine conditions (on a
    shared host, timing one program after another can differ by tens of percent). A sample of
    a short program is k back-to-back calls lasting about `min_seconds`: the best single call of
    a millisecond program is a lucky outlier more often than that of a longer one, which would
    bias short programs fast against long ones.

    Each process times its own devices, and every process gets process 0's figures
    (`agree.process0_floats`): decisions taken from them must be the same everywhere. A
    collective when there are several processes: every process calls it, in the same order."""
    k = {}
    for name, (fn, args) in calls.items():
        jax.block_until_ready(fn(*args))  # compiles on a first call
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        k[name] = max(1, round(min_seconds / max(time.perf_counter() - t0, 1e-6)))
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(reps):
        for name, (fn, args) in calls.items():
            t0 = time.perf_counter()
            for _ in range(k[name]):
                out = fn(*args)
            jax.block_until_ready(out)
            best[name] = min(best[name], (time.perf_counter() - t0) / k[name])
    return dict(zip(best, process0_floats(best.values()), strict=True))


def best_time(fn, *args, reps: int = 5) -> float:
    """Fastest of `reps` timed calls, after one warm-up call."""
    return best_times({"fn": (fn, args)}, reps)["fn"]


def _cpu_array(shape, scale=1.0):
    return jax.device_put(scale * jnp.ones(shape, jnp.float32), _cpu_devices()[0])


def _compile(fn, *args):
    """(compiled fn, XLA's FLOP count of it); the compiled program is what gets timed."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, float(cost.get("flops", 0.0))


def _flops_rate(fn, *args, reps: int = 7) -> float:
    """FLOP/s of fn(*args) on the running CPU: XLA's FLOP count of the compiled program (the
    same count the layers are costed with) over its best measured time."""
    compiled, flops = _compile(fn, *args)
    return flops / best_time(compiled, *args, reps=reps)


def _block_rate(b: int, T: int, d: int, ff: int, heads: int) -> float:
    """FLOP/s of forward + backward of a generic transformer kernel at a layer's shapes: causal
    softmax attention over `heads` heads on [b, T, d], then a GELU MLP d -> ff -> d."""
    dh = d // heads

    def loss(x, w_qkv, w_o, w1, w2):
        q, k, v = jnp.split((x @ w_qkv).reshape(b, T, 3 * heads, dh), 3, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(dh)
        scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -1e9)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        h = x + att.reshape(b, T, d) @ w_o
        return jnp.sum(h + jax.nn.gelu(h @ w1) @ w2)

    args = [(b, T, d), (d, 3 * d), (d, d), (d, ff), (ff, d)]
    scale = [1.0, 0.02, 0.02, 0.02, 0.02]
    grad = jax.grad(loss, argnums=tuple(range(5)))
    return _flops_rate(grad, *(_cpu_array(a, k) for a, k in zip(args, scale, strict=True)))


def _softmax_rate(tokens: int, d: int, vocab: int) -> float:
    """FLOP/s of forward + backward of a vocabulary projection with softmax cross-entropy."""

    def loss(x, w):
        return -jnp.mean(jax.nn.log_softmax(x @ w)[:, 0])

    grad = jax.grad(loss, argnums=(0, 1))
    return _flops_rate(grad, _cpu_array((tokens, d)), _cpu_array((d, vocab), 0.01))


# The model's own layers calibrate the CPU when their programs stay below this many elements
# (parameters of one block + embedding + head; the largest activation of one micro-batch).
CALIBRATION_ELEMENTS = 2**26
# Forced CPU devices share the host's cores, and the calibration times one program using all of
# them: ops of one tick on several devices then take as long as their sum (concurrency 1) unless
# `_model_rates` measures otherwise.
CPU_CONCURRENCY = 1.0


def runs_here(cfg: ModelConfig, b: int, T: int) -> bool:
    """Whether one block, the embedding and the head of `cfg` at micro-batch b run here for
    calibration (`CALIBRATION_ELEMENTS`)."""
    params = cfg.block_params() + cfg.embed_params() + cfg.head_params()
    widest = max(cfg.vocab_size, cfg.ff_dim, cfg.num_heads * T, cfg.d_model)
    return max(params, b * T * widest) <= CALIBRATION_ELEMENTS


def _cpu_devices() -> list:
    """This process's CPU devices (with several processes, programs that span them would need
    every process to time in lockstep)."""
    return jax.local_devices(backend="cpu")


def _cpu_mesh():
    """(k, mesh over this process's k CPU devices on axis "d", its PartitionSpec, a sharding
    that splits the leading axis over them, the `ppermute` pairs of a ring over them)."""
    devices = _cpu_devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    spec = jax.sharding.PartitionSpec("d")
    k = len(devices)
    ring = [(i, (i + 1) % k) for i in range(k)]
    return k, mesh, spec, jax.sharding.NamedSharding(mesh, spec), ring


def _waited(program):
    """program, each call returning once it has finished: CPU collectives of several programs
    in flight at once can deadlock."""
    return lambda *a: jax.block_until_ready(program(*a))


def _on_devices(fn, args):
    """{"one": (program, args), "all": (program, args)}: k lockstep ticks on this process's k
    CPU devices, as a pipeline's executor runs them. Each tick a device runs fn if it is busy
    ("all": every device; "one": device t only, the others waiting), then every device joins a
    `ppermute` (carrying a sum of fn's outputs, so none of fn is dead code). One program; who
    is busy when is an input, so the compiler cannot tell the two apart. Each device holds its
    own copy of args. None with one device; seconds per tick are the program's over k. Each
    call returns when the program has finished."""
    k, mesh, spec, on_all, ring = _cpu_mesh()
    if k == 1:
        return None
    shapes = jax.eval_shape(fn, *args)

    def idle(*_):
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

    def each(busy_1K, *xs):
        xs = jax.tree.map(lambda x: x[0], xs)

        def tick(c, busy):
            out = jax.lax.cond(busy, fn, idle, *xs)
            total = sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(out))
            return jax.lax.ppermute(c + total, "d", ring), None

        return jax.lax.scan(tick, jnp.zeros(()), busy_1K[0])[0][None]

    stacked = jax.tree.map(
        lambda a: jax.device_put(jnp.broadcast_to(a, (k, *a.shape)), on_all), args
    )
    spmd = _waited(jax.jit(jax.shard_map(each, mesh=mesh, in_specs=spec, out_specs=spec,
                                         check_vma=False)))
    busy = {"one": np.eye(k, dtype=bool), "all": np.ones((k, k), bool)}
    return {name: (spmd, (jax.device_put(b, on_all), *stacked)) for name, b in busy.items()}


def _model_rates(programs: dict, reps: int = 7) -> dict:
    """{micro-batch: `layer_programs` at it} -> {micro-batch: (block FLOP/s, head + loss FLOP/s,
    remat cost, concurrency)}, every program timed in one round-robin (`best_times`), so the
    figures of different micro-batches see the same machine conditions and rank as the
    programs do (calibrated one at a time, as a search reaches them, they drifted with the
    host by tens of percent against each other).

    Rates: XLA's FLOP count of each program over its best time (the head's is its program's
    minus the block's); remat cost: the block recomputed in its backward over the block.
    With several forced CPU devices a pipeline's ops run inside one SPMD program over all of
    them, in ticks that end in a collective, and a device whose turn it is runs on about one
    core where alone it would use several (`small`'s block at micro-batch 16 x 128, 4 devices
    on 2 cores: 85 ms a tick against 58-70 ms alone, 1.0 against 1.7-1.8 cores busy). So the
    block's rate is measured as the executor runs it, one device busy a tick (`_on_devices`);
    the head's is scaled by the same slowdown; and concurrency is how many devices run the
    block at that speed at once, k devices all busy a tick against one, k t_one / t_all.
    """
    calls, flops = {}, {}
    for b, progs in programs.items():
        for kind in ("block", "head", "block_remat"):
            fn, args = progs[kind]
            compiled, flops[b, kind] = _compile(fn, *args)
            calls[b, kind] = (compiled, args)
        for busy, call in (_on_devices(*progs["block"]) or {}).items():
            calls[b, busy] = call
    t = best_times(calls, reps)
    k = len(_cpu_devices())
    rates = {}
    for b in programs:
        alone = t[b, "block"]
        one = t[b, "one"] / k if (b, "one") in t else alone
        block = flops[b, "block"] / one
        head_t = (t[b, "head"] - alone) * one / alone
        head = (flops[b, "head"] - flops[b, "block"]) / head_t if head_t > 0 else block
        shared = k * t[b, "one"] / t[b, "all"] if (b, "all") in t else CPU_CONCURRENCY
        rates[b] = (block, head, t[b, "block_remat"] / alone, shared)
    return rates


def _shared_links(nbytes: float, reps: int = 5, messages: int = 20) -> tuple:
    """(bandwidth B/s, latency s) of a message between this process's CPU devices, and
    (bandwidth, latency) of an all-reduce over all of them. A message: every device sends one
    array to the next, `messages` times in one program (a `ppermute` ring, as the pipeline's
    sends); an all-reduce: `psum` of one array per device, `messages` times; each at 1 KiB and
    at `nbytes` (a stage boundary; 4 MiB at least). On forced devices either is one rendezvous
    of the devices plus copies in shared memory (not a ring of messages), and the rendezvous
    costs far more than the copy for small arrays. All four are timed in one round-robin
    (`best_times`), each call waited for (`_waited`)."""
    k, mesh, spec, on_all, ring = _cpu_mesh()
    if k == 1:
        return float("inf"), 0.0, float("inf"), 0.0
    ops = {
        "send": lambda x: jax.lax.ppermute(x, "d", ring),
        "reduce": lambda x: jax.lax.pcast(jax.lax.psum(x, "d") * (1 / k), "d", to="varying"),
    }
    # The large message is at least 4 MiB: a smaller one's copy time hides in the latency's noise.
    sizes = {"small": 256, "large": max(int(nbytes), 4 * 2**20) // 4}
    calls = {}
    for op_name, op in ops.items():
        loop = _waited(jax.jit(jax.shard_map(
            lambda x, op=op: jax.lax.fori_loop(0, messages, lambda _, x: op(x), x),
            mesh=mesh, in_specs=spec, out_specs=spec,
        )))
        for name, n in sizes.items():
            x = jax.device_put(jnp.ones((k * n,), jnp.float32), on_all)
            calls[op_name, name] = (loop, (x,))
    t = {key: seconds / messages for key, seconds in best_times(calls, reps).items()}
    extra = 4 * (sizes["large"] - sizes["small"])
    figures = []
    for op_name in ops:
        gap = max(t[op_name, "large"] - t[op_name, "small"], 1e-9)
        figures += [extra / gap, t[op_name, "small"]]
    return tuple(figures)


def host_memory() -> float:
    """This host's physical memory in bytes (16 GiB where the system does not say)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float(16 * GiB)


def calibrate_cpu(
    model_cfg: ModelConfig | None = None,
    microbatch: int | None = None,
    seq_len: int | None = None,
) -> DeviceProfile:
    """The running CPU's profile, measured at the model's own shapes (`calibrate_cpu_shapes`)."""
    return calibrate_cpu_shapes(model_cfg, (microbatch,), seq_len)[microbatch]


def calibrate_cpu_shapes(
    model_cfg: ModelConfig | None, microbatches, seq_len: int | None
) -> dict:
    """{micro-batch: the running CPU's profile at (micro-batch, seq_len)}, measured once per
    shape; the shapes not measured yet are measured together, in one round-robin.

    A CPU's FLOP rate depends strongly on the program and its shapes (small programs run far
    below a large matmul's rate, attention below the MLP's), so the peak is the FLOP/s of the
    model's own block, forward + backward at (micro-batch, seq_len), and the head's rate that of
    its own head + loss: XLA's FLOP count over the best measured time, the same count the
    layers are costed with (`_model_rates`). A model too large to run one block here (see
    `CALIBRATION_ELEMENTS`), or no model, is calibrated with generic kernels: causal attention
    + GELU MLP at (2, 128, 512, 2048, 8 heads), softmax cross-entropy at (256, 512, 32000).
    With several forced CPU devices, `concurrency` is measured too (how many of them run the
    block at full speed at once), and so are the links between them (`_shared_links`: the
    pipeline's sends, and an all-reduce for the tensor and data collectives; once per model and
    sequence length). Memory bandwidth comes from a timed read-only reduction over 64 MiB (a
    copy into fresh buffers would measure page faults)."""
    microbatches = tuple(dict.fromkeys(microbatches))
    todo = [b for b in microbatches if (model_cfg, b, seq_len) not in _CPU_PROFILE]
    if todo:
        memory = process0_floats([host_memory()])[0]  # the same profile in every process
        buf = _cpu_array((16 * 2**20,))
        bandwidth = buf.nbytes / best_time(jax.jit(jnp.sum), buf)
        own = [
            b for b in todo
            if None not in (model_cfg, b, seq_len) and runs_here(model_cfg, b, seq_len)
        ]
        rates = _model_rates({b: layer_programs(model_cfg, b, seq_len) for b in own})
        if own and (model_cfg, seq_len) not in _SHARED:  # kept when profiles are re-measured
            boundary = max(own) * seq_len * model_cfg.d_model * 4
            _SHARED[model_cfg, seq_len] = _shared_links(boundary)
        generic = None
        if len(own) < len(todo):
            generic = (_block_rate(2, 128, 512, 2048, 8), _softmax_rate(256, 512, 32000),
                       None, CPU_CONCURRENCY)
        for b in todo:
            flops, head_flops, remat_cost, concurrency = rates[b] if b in rates else generic
            bw, latency, r_bw, r_latency = (
                _SHARED[model_cfg, seq_len] if b in rates else (bandwidth, 0.0, None, None)
            )
            links = Links(bw, bw, latency, latency, devices_per_node=2**20,
                          reduce_bandwidth=r_bw, reduce_latency=r_latency)
            _CPU_PROFILE[model_cfg, b, seq_len] = DeviceProfile(
                "cpu", flops, bandwidth, memory, links,
                head_flops, concurrency=concurrency, remat_cost=remat_cost,
            )
    return {b: _CPU_PROFILE[model_cfg, b, seq_len] for b in microbatches}


def get_profile(
    device: str | DeviceProfile,
    model_cfg: ModelConfig | None = None,
    microbatch: int | None = None,
    seq_len: int | None = None,
) -> DeviceProfile:
    """A named profile; "cpu" is measured (with the model's own layers when they are given)."""
    if isinstance(device, DeviceProfile):
        return device
    if device == "cpu":
        return calibrate_cpu(model_cfg, microbatch, seq_len)
    if device not in PROFILES:
        raise ConfigError(f"unknown device {device!r}; choose one of {list(DEVICES)}")
    return PROFILES[device]


def get_profiles(device: str | DeviceProfile, model_cfg, microbatches, seq_len) -> dict:
    """{micro-batch: `get_profile` at it}; a measured CPU's shapes are measured together
    (`calibrate_cpu_shapes`)."""
    if device == "cpu":
        return calibrate_cpu_shapes(model_cfg, microbatches, seq_len)
    return {b: get_profile(device, model_cfg, b, seq_len) for b in microbatches}


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One layer's forward + backward on one micro-batch, per device."""

    flops: float
    bytes_accessed: float
    transcendentals: float
    params: int  # parameters held per device
    argument_bytes: float  # XLA memory_analysis of the fwd+bwd program
    temp_bytes: float
    activation_bytes: float  # residuals kept for the backward pass, per micro-batch
    # What B hands W for the layer rematerialised, per micro-batch, in a split table: the
    # recomputed matmul inputs and the output cotangents (`backsplit`).
    carry_bytes: float = 0.0

    def time(self, profile: DeviceProfile, head: bool = False) -> float:
        return profile.roofline(self.flops, self.bytes_accessed, head)

    def scaled(self, k: float) -> LayerCost:
        """The tensor-parallel share of one of k devices: every figure divided by k."""
        return LayerCost(*(getattr(self, f.name) / k for f in dataclasses.fields(self)))


@dataclasses.dataclass(frozen=True)
class ModelCosts:
    block: LayerCost
    embed: LayerCost
    head: LayerCost
    boundary_bytes: float  # one micro-batch activation [b, T, D] sent between stages
    microbatch: int  # per-device micro-batch size b
    seq_len: int
    # W's share of a block's backward (without remat) in a split table: its matmul FLOPs over
    # the backward's (`backsplit`); 0.5 (B and W alike) where not measured.
    w_share: float = 0.5


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _residual_bytes(fn, *args) -> float:
    """Bytes of the residuals autodiff saves for `fn`'s backward pass."""
    if saved_residuals is None:  # pragma: no cover - private API moved
        return float("nan")
    return float(sum(a.size * a.dtype.itemsize for a, _ in saved_residuals(fn, *args)))


def _split_costs(cfg: ModelConfig, w, x) -> tuple[float, float]:
    """What splitting a block's backward into B and W costs (`backsplit`), for weights `w` and
    input `x`: (bytes of the carry B leaves W when the block is rematerialised, the executor's
    `model.block_fn(cfg, "layer")`; W's share of the plain block's backward matmul FLOPs)."""

    def split(remat):
        layer = M.block_fn(cfg, remat)

        def backward(free, stashed, dy):
            return jax.vjp(layer, free[0], stashed[0])[1](dy)

        return BackwardSplit(backward, (w,), [x], x)

    carry = split("layer").carry_vars
    plain = split("none")
    b, w_flops = _matmul_flops(plain.b_eqns), _matmul_flops(plain.w_eqns)
    share = w_flops / (b + w_flops) if b + w_flops else 0.5
    return float(sum(v.aval.size * v.aval.dtype.itemsize for v in carry)), share


def _matmul_flops(eqns) -> float:
    """FLOPs of the matmuls among `eqns` (and inside their sub-programs), from their shapes."""
    total = 0.0
    for e in eqns:
        if e.primitive.name == "dot_general":
            (contract, _), _ = e.params["dimension_numbers"]
            lhs = e.invars[0].aval.shape
            k = float(np.prod([lhs[i] for i in contract]))
            total += 2.0 * float(np.prod(e.outvars[0].aval.shape)) * k
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            total += _matmul_flops(sub.eqns)
    return total


def _layer_cost(make, b: int, params: int, device=None) -> LayerCost:
    """Costs fwd+bwd of `fn(diff, aux)` where `make(b) -> (fn, diff, aux)` builds abstract args
    at micro-batch b; activations = residual bytes at 2b minus at b (what grows with the batch).
    Compiled for `device` (e.g. a compile-only TPU chip), or for the host's default device."""
    fn, diff, aux = make(b)

    def fwd_bwd(diff, aux, cot):
        _, vjp = jax.vjp(lambda d: fn(d, aux), diff)
        return vjp(cot)

    cot = jax.eval_shape(fn, diff, aux)
    args = (diff, aux, cot)
    if device is not None:
        on = jax.sharding.SingleDeviceSharding(device)
        args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on), args)
    compiled = jax.jit(fwd_bwd).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    fn2, diff2, aux2 = make(2 * b)
    act = _residual_bytes(fn2, diff2, aux2) - _residual_bytes(fn, diff, aux)
    return LayerCost(
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        transcendentals=float(cost.get("transcendentals", 0.0)),
        params=params,
        argument_bytes=float(mem.argument_size_in_bytes),
        temp_bytes=float(mem.temp_size_in_bytes),
        activation_bytes=max(act, 0.0),
    )


def microbatch_size(pipe_cfg: PipelineConfig, batch_size: int) -> int:
    """Per-device micro-batch: batch / (M x data_parallel); raises naming the fix."""
    pipe_cfg.check_batch(batch_size)
    return batch_size // (pipe_cfg.num_microbatches * pipe_cfg.data_parallel)


def model_costs(
    model_cfg: ModelConfig,
    pipe_cfg: PipelineConfig,
    *,
    batch_size: int,
    seq_len: int,
    device=None,
) -> ModelCosts:
    """Compiles one block, the embedding and the head + loss (fwd + bwd) from abstract shapes,
    for `device` (a compile-only TPU chip gives the target compiler's own temp bytes) or for the
    host."""
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"seq_len {seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}; use "
            f"--seq_len <= {model_cfg.max_seq_len} or raise the model's (--max_seq_len)"
        )
    b, T, D = microbatch_size(pipe_cfg, batch_size), seq_len, model_cfg.d_model
    tp = pipe_cfg.tensor_parallel
    cfg = model_cfg
    dt = jnp.dtype(cfg.dtype)
    params = _abstract(M.abstract_params(cfg))
    block_p = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), params["blocks"])
    x = lambda b: jax.ShapeDtypeStruct((b, T, D), dt)
    tokens = lambda b: jax.ShapeDtypeStruct((b, T), jnp.int32)

    def make_block(b):
        return (lambda d, _: M.block_apply(cfg, d[0], d[1]), (block_p, x(b)), None)

    def make_embed(b):
        return (lambda d, tok: M.embed_apply(cfg, {"embed": d}, tok), params["embed"], tokens(b))

    def make_head(b):
        def fn(d, tgt):
            p, h = d
            return M.head_loss(cfg, p, h, tgt)

        p = {"embed": params["embed"] if cfg.tied else {}, "head": params["head"]}
        return fn, (p, x(b)), tokens(b)

    block = _layer_cost(make_block, b, cfg.block_params(), device)
    carry, w_share = _split_costs(cfg, block_p, x(b))
    block = dataclasses.replace(block, carry_bytes=carry).scaled(tp)
    embed = _layer_cost(make_embed, b, cfg.embed_params(), device)
    head = _layer_cost(make_head, b, cfg.head_params(), device).scaled(tp)
    return ModelCosts(block, embed, head, float(b * T * D * dt.itemsize), b, T, w_share)
