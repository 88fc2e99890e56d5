"""One contract over every public handler: builds, state round-trips, attaching twice is refused.

Every name in ``handlers.__all__`` must appear in ``BUILDERS`` (a new export
without an entry fails here), so no handler escapes the contract.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from ignite.metrics import Accuracy

import handlers
from engine_kit import create_evaluator, create_trainer
from handlers.base import Handler
from tests.helpers import classification_batches, mlp


def trainer_and_evaluator():
    model = mlp()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy)
    evaluator = create_evaluator(model, metrics={"accuracy": Accuracy()})
    return trainer, evaluator


VAL = classification_batches(2, 4, seed=9)

# name -> builder(tmp_path, evaluator) for handler classes; None for functions and plain types.
BUILDERS = {
    "CheckpointRotation": lambda tmp, ev: handlers.CheckpointRotation(tmp / "ckpt"),
    "Doctor": lambda tmp, ev: handlers.Doctor(path=tmp / "doctor.json"),
    "EarlyStopping": lambda tmp, ev: handlers.EarlyStopping(metric="accuracy", patience=2, mode="max"),
    "GradNormLogger": lambda tmp, ev: handlers.GradNormLogger(),
    "NanGuard": lambda tmp, ev: handlers.NanGuard(),
    "Preemption": lambda tmp, ev: handlers.Preemption(handlers.CheckpointRotation(tmp / "ckpt")),
    "ProgressBar": lambda tmp, ev: handlers.ProgressBar(disable=True),
    "StepLog": lambda tmp, ev: handlers.StepLog(tmp / "steps.jsonl"),
    "TensorBoardLogger": lambda tmp, ev: handlers.TensorBoardLogger(log_dir=tmp / "tb"),
    "Validation": lambda tmp, ev: handlers.Validation(ev, VAL),
    # Not handlers: policy objects, events, result types and functions (tested in their own files).
    "EarlyStopChecker": None,
    "PREEMPTED_EXIT_STATUS": None,
    "RotationPolicy": None,
    "StandardHandlers": None,
    "ValidationEvents": None,
    "attach_plateau_scheduler": None,
    "attach_scheduler": None,
    "attach_standard": None,
    "onecycle_total_steps": None,
    "optimizer_steps_per_epoch": None,
    "read_step_log": None,
    "register_validation_events": None,
    "to_csv": None,
    "warmup_cosine": None,
}
HANDLER_NAMES = sorted(name for name, build in BUILDERS.items() if build is not None)


def test_every_export_is_covered():
    assert sorted(BUILDERS) == sorted(handlers.__all__)
    exported_handlers = sorted(
        name for name in handlers.__all__ if isinstance(getattr(handlers, name), type)
        and issubclass(getattr(handlers, name), Handler)
    )
    assert exported_handlers == HANDLER_NAMES


@pytest.mark.parametrize("name", HANDLER_NAMES)
def test_builds_runs_and_state_round_trips(name, tmp_path):
    trainer, evaluator = trainer_and_evaluator()
    handler = BUILDERS[name](tmp_path, evaluator)
    handler.attach(trainer)
    trainer.run(classification_batches(4, 4), max_epochs=2)
    state = handler.state_dict()
    copy.deepcopy(state)  # plain data, no live references that cannot be copied
    (tmp_path / "twin").mkdir()
    twin = BUILDERS[name](tmp_path / "twin", create_evaluator(mlp(), metrics={"accuracy": Accuracy()})) \
        if name != "CheckpointRotation" else None
    if twin is not None:
        twin.load_state_dict(state)
        assert _plain(twin.state_dict()) == _plain(state)
    with pytest.raises(ValueError, match="To fix"):
        handler.load_state_dict({**state, "not_a_key": 1})


@pytest.mark.parametrize("name", HANDLER_NAMES)
def test_attaching_twice_is_refused(name, tmp_path):
    trainer, evaluator = trainer_and_evaluator()
    handler = BUILDERS[name](tmp_path, evaluator)
    handler.attach(trainer)
    with pytest.raises(RuntimeError, match="already attached.*To fix"):
        handler.attach(trainer)


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
