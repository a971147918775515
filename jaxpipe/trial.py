"""The autotuner's first choices timed on the devices present.

The autotuner ranks configurations by predicted step time, and its model errs by some per cent
(on forced CPU devices `experiments/bench_autotune.py` measures its median error), so
candidates predicted within that of each other are a toss-up to the prediction: the same mesh
with and without remat, or two schedules with the same bubble. Where the devices are at hand,
`trial` settles it: it runs the real training steps of the search's first `count` candidates
(`steptime.measure_steps`: after a compiling step, the fastest of `reps`, the candidates timed
round-robin so that a host's drift hits them alike) and ranks them by the measured step.
"""

from __future__ import annotations

import dataclasses
import json

import jax

from jaxpipe.autotune import CANDIDATE_COLUMNS, AutotuneResult, Candidate
from jaxpipe.config import ConfigError
from jaxpipe.steptime import measure_steps

DEFAULT_COUNT = 3  # candidates timed


def platform_of(device: str) -> str:
    """JAX's platform name for a device profile: cpu, tpu (tpu-v5p, ...) or gpu."""
    if device == "cpu":
        return "cpu"
    return "tpu" if device.startswith("tpu") else "gpu"


@dataclasses.dataclass(frozen=True)
class Trial:
    """A search with its first len(measured_s) candidates timed (measured_s[i] is
    result.candidates[i]'s step in seconds)."""

    result: AutotuneResult
    measured_s: tuple[float, ...]
    reps: int

    @property
    def ranked(self) -> list[int]:
        """The timed candidates' indices, fastest measured first (ties: the search's order)."""
        return sorted(range(len(self.measured_s)), key=lambda i: (self.measured_s[i], i))

    @property
    def best(self) -> Candidate:
        return self.result.candidates[self.ranked[0]]

    def table(self) -> str:
        c = self.result.cluster
        rows = self.result.table().splitlines()[:-1]  # the search's own "best:" line goes
        rows.append(f"timed on {c.num_devices} {platform_of(c.device)} devices (the fastest of "
                    f"{self.reps} steps each), fastest first:")
        rows.append(f"{CANDIDATE_COLUMNS} {'predicted':>9} {'measured':>9} {'ratio':>6}")
        for i in self.ranked:
            k, measured = self.result.candidates[i], self.measured_s[i]
            rows.append(f"{k.columns(i + 1)} {k.plan.step_time_s:>9.3f} {measured:>9.3f} "
                        f"{measured / k.plan.step_time_s:>6.2f}")
        rows.append("best (timed): " + self.best.flags(c.device))
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {
            "search": self.result.to_dict(),
            "reps": self.reps,
            "timed": [
                {"candidate": i + 1, "predicted_s": self.result.candidates[i].plan.step_time_s,
                 "measured_s": self.measured_s[i]}
                for i in self.ranked
            ],
            "best_command": self.best.flags(self.result.cluster.device),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def trial(result: AutotuneResult, count: int = DEFAULT_COUNT, reps: int = 5) -> Trial:
    """`result`'s first `count` candidates timed on JAX's devices (they must be the cluster's:
    as many, of the profile's platform); a ConfigError naming the fix otherwise."""
    if count < 1 or reps < 1:
        raise ConfigError(f"--time and its reps must be >= 1, got {count} and {reps}")
    c = result.cluster
    devices = jax.devices()
    want = platform_of(c.device)
    if devices[0].platform != want:
        raise ConfigError(
            f"timing runs the candidates here, but the search planned {c.device} devices "
            f"({want}) and this host's are {devices[0].platform}: plan with --device for the "
            f"devices present, or leave timing out"
        )
    if len(devices) < c.num_devices:
        hint = (f"; for forced CPU devices set XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{c.num_devices} before JAX starts" if want == "cpu" else "")
        raise ConfigError(
            f"timing runs the candidates here, but the search planned {c.num_devices} devices "
            f"and this host has {len(devices)}: plan with --devices {len(devices)}, or leave "
            f"timing out{hint}"
        )
    runs = [k.step_run() for k in result.candidates[:count]]
    return Trial(result, tuple(measure_steps(runs, reps)), reps)
