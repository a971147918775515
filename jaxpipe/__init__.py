"""jaxpipe: pipeline parallelism for Flax transformers on JAX."""

import warnings

# `python -m jaxpipe.schedule` runs a module this package has already imported; runpy's warning
# about it says nothing to a user of the command.
warnings.filterwarnings(
    "ignore", message=r"'jaxpipe\.\w+' found in sys\.modules", category=RuntimeWarning
)

from jaxpipe.tpuhost import compile_only_env

compile_only_env()  # before JAX starts its backends: libtpu quiet on a host with no TPU chip

from jaxpipe.checkpoint import Checkpoints, load_params, train_resumable
from jaxpipe.config import (
    PRESETS,
    ConfigError,
    ModelConfig,
    PipelineConfig,
    get_preset,
)
from jaxpipe.data import TokenData, load_data
from jaxpipe.layout import StageLayout
from jaxpipe.mesh import make_mesh
from jaxpipe.model import abstract_params, init_params, reference_loss
from jaxpipe.partition import make_plan
from jaxpipe.pipeline import Pipeline
from jaxpipe.report import Plan
from jaxpipe.sampling import generate
from jaxpipe.schedule import ScheduleTable, build_table
from jaxpipe.train import TrainConfig, Trainer, TrainState, train
from jaxpipe.workdir import WorkdirBusy, check_workdir, hold_workdir, lock_workdir

__all__ = [
    "Checkpoints",
    "load_params",
    "train_resumable",
    "PRESETS",
    "ConfigError",
    "ModelConfig",
    "PipelineConfig",
    "get_preset",
    "TokenData",
    "load_data",
    "StageLayout",
    "make_mesh",
    "abstract_params",
    "init_params",
    "reference_loss",
    "make_plan",
    "Plan",
    "generate",
    "Pipeline",
    "ScheduleTable",
    "build_table",
    "TrainConfig",
    "Trainer",
    "TrainState",
    "train",
    "WorkdirBusy",
    "check_workdir",
    "hold_workdir",
    "lock_workdir",
]
