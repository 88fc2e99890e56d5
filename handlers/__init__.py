"""Event handlers for engine_kit trainers; each usable alone, ``attach_standard`` wires them all.

Every handler is a class with keyword-only options, ``attach(trainer)``,
``__call__(engine)`` and ``state_dict``/``load_state_dict`` (registered for
checkpoints on attach).

>>> import handlers
>>> "CheckpointRotation" in handlers.__all__
True
"""

from handlers.checkpoint import CheckpointRotation
from handlers.doctor import Doctor
from handlers.early_stopping import EarlyStopChecker, EarlyStopping
from handlers.events import ValidationEvents, register_validation_events
from handlers.grad_norm import GradNormLogger
from handlers.nan_guard import NanGuard
from handlers.preemption import PREEMPTED_EXIT_STATUS, Preemption
from handlers.progress import ProgressBar
from handlers.rotation_policy import RotationPolicy
from handlers.schedulers import (
    attach_plateau_scheduler,
    attach_scheduler,
    onecycle_total_steps,
    optimizer_steps_per_epoch,
    warmup_cosine,
)
from handlers.standard import StandardHandlers, attach_standard
from handlers.step_log import StepLog, read_step_log, to_csv
from handlers.tensorboard import TensorBoardLogger
from handlers.validation import Validation

__all__ = [
    "CheckpointRotation",
    "Doctor",
    "EarlyStopChecker",
    "EarlyStopping",
    "GradNormLogger",
    "NanGuard",
    "PREEMPTED_EXIT_STATUS",
    "Preemption",
    "ProgressBar",
    "RotationPolicy",
    "StandardHandlers",
    "StepLog",
    "TensorBoardLogger",
    "Validation",
    "ValidationEvents",
    "attach_plateau_scheduler",
    "attach_scheduler",
    "attach_standard",
    "onecycle_total_steps",
    "optimizer_steps_per_epoch",
    "read_step_log",
    "register_validation_events",
    "to_csv",
    "warmup_cosine",
]
