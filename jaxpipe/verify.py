"""The autotuner's first choices compiled for the devices they are planned for.

The planner's memory per device (`partition.device_memory`) is an estimate of what the
compiler will allocate; the compiler has the last word, and its choices (which buffers it keeps
alive across a loop, which it rematerialises) differ between kernels and shapes. `verify`
compiles the training steps of a search's candidates, best first, for a topology of the
cluster's size (`aot.compile_plan`: libtpu's compile-only devices for a TPU pod, or forced CPU
devices; nothing is allocated), until one fits the memory the search was given (the profile's
HBM, or `--memory_gib`), trying at most `count` of them. Its best is the first candidate that
compiled within that memory, with the compiler's figure beside the estimate.
"""

from __future__ import annotations

import dataclasses
import json

from jaxpipe.aot import AotReport, compile_plan, size_text
from jaxpipe.autotune import AutotuneResult, Candidate, choose
from jaxpipe.config import ConfigError, ModelConfig, PipelineConfig
from jaxpipe.topology import Topology, present, resolve
from jaxpipe.trial import Trial, trial

DEFAULT_COUNT = 3  # candidates compiled at most


def fits_in(report: AotReport, capacity: float) -> bool:
    """Whether the compiled step fits the device and `capacity` bytes of it."""
    return report.fits and report.memory["total"] <= capacity


@dataclasses.dataclass(frozen=True)
class Verification:
    """A search's first candidates as compiled for `topology` (reports[i] is candidates[i]'s)."""

    result: AutotuneResult
    topology: str
    capacity: float  # bytes per device the compiled step must fit in
    reports: tuple[AotReport, ...]

    def fits(self, report: AotReport) -> bool:
        return fits_in(report, self.capacity)

    @property
    def fitting(self) -> tuple[Candidate, ...]:
        """The candidates whose compiled step fits, best first."""
        return tuple(k for k, report in zip(self.result.candidates, self.reports, strict=False)
                     if self.fits(report))

    @property
    def best(self) -> Candidate | None:
        """The first candidate whose compiled step fits, or None when none of those tried did."""
        return next(iter(self.fitting), None)

    def _row(self, i: int, report: AotReport) -> str:
        k = self.result.candidates[i]
        p = k.pipe_cfg
        head = (f"{i + 1:>2} {k.mesh():>10} {p.schedule:>16} R {p.num_repeats} "
                f"M {p.num_microbatches} {p.remat} {k.state_split}: ")
        if report.memory is None:
            o = report.oom
            need = "?" if o["required"] is None else size_text(o["required"])
            have = "?" if o["available"] is None else size_text(o["available"])
            what = f"out of memory ({o['what'] or 'memory'} {need} > {have} available)"
        else:
            total = report.memory["total"]
            verdict = "fits" if self.fits(report) else "over the budget"
            what = f"{size_text(total)}, {verdict} (compiled / predicted {report.ratio:.2f})"
        return head + f"{what}; estimate {size_text(k.memory_bytes)}, {report.compile_s:.0f} s"

    def table(self) -> str:
        rows = self.result.table().split("\n")[:-1]  # all but its own best line
        rows.append(
            f"compiled for {self.topology} (budget {size_text(self.capacity)} per device):"
        )
        rows += [self._row(i, r) for i, r in enumerate(self.reports)]
        best = self.best
        if best is None:
            rows.append(
                f"best: none of the first {len(self.reports)} candidates compiled within "
                f"{size_text(self.capacity)} per device; compile more (--verify), or search "
                "with less memory (--memory_gib) so the estimates leave more headroom"
            )
        else:
            rows.append("best (compiled to fit): " + best.flags(self.result.cluster.device))
        return "\n".join(rows)

    def to_dict(self) -> dict:
        best = self.best
        return {
            **self.result.to_dict(),
            "verified_on": self.topology,
            "verified_capacity_bytes": self.capacity,
            "verified": [{"fits": self.fits(r), **r.to_dict()} for r in self.reports],
            "verified_best": None if best is None else self.result.candidates.index(best),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def verify(result: AutotuneResult, topology: str | Topology, count: int = DEFAULT_COUNT,
           capacity: float | None = None, fitting: int = 1) -> Verification:
    """Compiles `result`'s candidates, best first, for `topology` (a topology string, or a
    `Topology` such as `topology.present()`) until `fitting` of them fit `capacity` bytes per
    device (default: the memory per device the search was given, and at most the devices'
    own), at most `count` of them."""
    if count < 1:
        raise ConfigError(f"--verify must be >= 1 candidate, got {count}")
    topo = resolve(topology)
    topology = topo.name
    devices = len(topo.devices)
    if devices != result.cluster.num_devices:
        raise ConfigError(
            f"topology {topology} has {devices} devices but the search planned for "
            f"{result.cluster.num_devices}; give a topology of {result.cluster.num_devices} "
            "devices (or --devices to match it)"
        )
    if capacity is None:
        searched = next(iter(result.profiles.values()), None)
        profile = searched or result.cluster.profile(result.model_cfg, 1, result.seq_len)
        capacity = min(profile.hbm_bytes, topo.hbm_bytes)
    reports, fit = [], 0
    for k in result.candidates[:count]:
        report = compile_plan(k.plan, batch_size=k.global_batch, seq_len=k.seq_len,
                              topology=topo)
        reports.append(report)
        fit += fits_in(report, capacity)
        if fit >= fitting:
            break
    return Verification(result, topology, capacity, tuple(reports))


def choose_compiled(model_cfg: ModelConfig, base: PipelineConfig, *, device: str,
                    global_batch: int, seq_len: int, devices=None, compile: bool | None = None,
                    time: int = 0) -> tuple[AutotuneResult | Verification | Trial, Candidate]:
    """(the search's result, the candidate to train) for the devices present (`devices`,
    default all of JAX's; `autotune.choose`). With `compile` (default: on accelerators, whose
    memory a step can overrun; not on a CPU host), the candidates are compiled for those
    devices, best first (`verify`), and the first that fits is the one to train; a
    ConfigError when none of the first `DEFAULT_COUNT` does. With `time` = K, the first K
    candidates (that compile within the memory, where compiled) run their steps there and the
    fastest measured is the one to train (`trial`)."""
    topo = present(devices)
    per_node = max(1, len(topo.devices) // max(1, len({d.process_index for d in topo.devices})))
    found = choose(model_cfg, base, num_devices=len(topo.devices), device=device,
                   global_batch=global_batch, seq_len=seq_len, devices_per_node=per_node)
    if compile is None:
        compile = topo.platform != "cpu"
    chosen = found
    if compile:
        want = max(time, 1)
        checked = verify(found, topo, DEFAULT_COUNT + want - 1, fitting=want)
        if checked.best is None:
            raise ConfigError(checked.table().splitlines()[-1].removeprefix("best: "))
        if not time:
            return checked, checked.best
        chosen = dataclasses.replace(found, candidates=checked.fitting)
    if not time:
        return found, found.best
    timed = trial(chosen, time)
    return timed, timed.best
