"""engine_kit: a training loop you can trust, on pytorch-ignite.

>>> from engine_kit import create_trainer, create_evaluator, StepEvents, StepOutput
"""

from engine_kit.data_order import ResumableLoader
from engine_kit.engine import GuardedEngine
from engine_kit.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointWriteError,
    HandlerError,
)
from engine_kit.evaluator import create_evaluator
from engine_kit.events import StepEvents
from engine_kit.precision import Precision, resolve_precision
from engine_kit.resumable import resumable_objects
from engine_kit.state import StepOutput
from engine_kit.trainer import create_trainer

__version__ = "0.1.0"

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "GuardedEngine",
    "HandlerError",
    "Precision",
    "ResumableLoader",
    "StepEvents",
    "StepOutput",
    "create_evaluator",
    "create_trainer",
    "resolve_precision",
    "resumable_objects",
]
