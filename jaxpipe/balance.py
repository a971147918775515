"""Imbalance detection: a plan's predicted stage times against measured ones.

`check_balance` compares them and, when the slowest stage is more than `threshold` x the
fastest, re-partitions with the measured per-layer times.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpipe.measure import StageTimes
from jaxpipe.partition import replan
from jaxpipe.report import Plan


@dataclasses.dataclass(frozen=True)
class BalanceReport:
    ratio: float  # measured slowest / fastest stage
    predicted_s: tuple[float, ...]  # the plan's compute time per stage (no link transfer)
    measured_s: tuple[float, ...]
    max_error: float  # max |predicted - measured| / measured
    suggestion: Plan | None  # re-partition from measured layer times, when ratio > threshold


def check_balance(plan: Plan, measured: StageTimes, threshold: float = 1.2) -> BalanceReport:
    """Predicted vs measured stage times; suggests a re-partition when imbalance > threshold."""
    cm = plan.cost_model
    R = plan.pipe_cfg.num_repeats
    predicted = np.array(plan.stage_times) - R * cm.transfer_time
    meas = np.array(measured.stage_s)
    ratio = float(meas.max() / meas.min())
    suggestion = None
    if ratio > threshold:
        lt = measured.layer_s
        cm_meas = dataclasses.replace(
            cm, block_time=lt["block"], embed_time=lt["embed"], head_time=lt["head"]
        )
        suggestion = replan(plan, cm_meas, method="measured")
    return BalanceReport(
        ratio=ratio,
        predicted_s=tuple(predicted.tolist()),
        measured_s=tuple(meas.tolist()),
        max_error=float(np.max(np.abs(predicted - meas) / meas)),
        suggestion=suggestion,
    )
