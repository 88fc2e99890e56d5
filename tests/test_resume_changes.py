"""Resuming with changed settings: each change is exact, refused before anything is applied, or warned.

A checkpoint is taken after one epoch of a small run (ResumableLoader, AdamW,
StepLR, accumulation 2). A second run, built with one setting changed, restores
it in its STARTED handler. For a refusal the test compares the model, the
optimizer, the scheduler, the trainer and the loader position before and after
the refused call: nothing may have moved. None of the changes is silent.
"""

from __future__ import annotations

import copy
import io
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from engine_kit import CheckpointMismatchError, create_trainer
from engine_kit.data_order import ResumableLoader
from engine_kit.training_state import capture_training_state, restore_training_state
from handlers import attach_scheduler
from handlers.checkpoint import CheckpointRotation
from tests.helpers import assert_same

BASE = {
    "seed": 7, "batch_size": 4, "accumulation": 2, "precision": "fp32", "data_offset": 0.0, "loader": "resumable",
    "lr": 0.01, "scheduler": "steplr", "width": 8, "optimizer": "adamw",
}


class Samples(torch.utils.data.Dataset):
    """24 fixed samples; ``offset`` shifts every feature (another dataset of the same length)."""

    def __init__(self, offset: float) -> None:
        gen = torch.Generator().manual_seed(5)
        self.x = torch.randn(24, 6, generator=gen) + offset
        self.y = torch.randint(0, 3, (24,), generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i] + 0.01 * torch.randn(6), self.y[i]


def build(**changes):
    cfg = {**BASE, **changes}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, cfg["width"]), torch.nn.ReLU(), torch.nn.Linear(cfg["width"], 3))
    optimizer_cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[cfg["optimizer"]]
    optimizer = optimizer_cls(model.parameters(), lr=cfg["lr"])
    trainer = create_trainer(model, optimizer, F.cross_entropy, precision=cfg["precision"],
                             accumulation_steps=cfg["accumulation"])
    scheduler = None
    if cfg["scheduler"] == "steplr":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    elif cfg["scheduler"] == "exponential":
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    if scheduler is not None:
        attach_scheduler(trainer, scheduler)
    dataset = Samples(cfg["data_offset"])
    if cfg["loader"] == "resumable":
        loader = ResumableLoader(dataset, cfg["batch_size"], seed=cfg["seed"])
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg["batch_size"], shuffle=True)
    return trainer, loader, scheduler


@pytest.fixture(scope="module")
def payload():
    trainer, loader, _ = build()
    trainer.run(loader, max_epochs=1)
    buffer = io.BytesIO()
    torch.save(capture_training_state(trainer), buffer)  # a copy, as from disk
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def snapshot(trainer, loader, scheduler):
    return copy.deepcopy({
        "model": trainer.step.model.state_dict(),
        "optimizer": trainer.step.optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "trainer": dict(trainer.state_dict()),
        "loader": (loader.epoch, loader.consumed) if isinstance(loader, ResumableLoader) else None,
    })


def resume_with(payload, strict=True, **changes):
    """Restore ``payload`` into a run built with ``changes``: (error or None, warnings, before, after)."""
    trainer, loader, scheduler = build(**changes)
    result = {}

    @trainer.on(Events.STARTED)
    def restore(engine):
        result["before"] = snapshot(engine, loader, scheduler)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                restore_training_state(engine, copy.deepcopy(payload), strict=strict)
                result["error"] = None
            except CheckpointMismatchError as err:
                result["error"] = err
        result["warnings"] = [str(w.message) for w in caught]
        result["after"] = snapshot(engine, loader, scheduler)
        engine.terminate()

    trainer.run(loader, max_epochs=2)
    return result


# change -> (outcome, what the error or warning must name)
MATRIX = {
    "unchanged": ({}, "exact", None),
    "seed": ({"seed": 8}, "refused", r"data order: seed: checkpoint 7 vs live 8"),
    "batch size": ({"batch_size": 3}, "refused", r"epoch length: checkpoint 6 batches vs live 8"),
    "accumulation": ({"accumulation": 1}, "refused", r"accumulation_steps: checkpoint 2 vs live 1"),
    "precision": ({"precision": "bf16"}, "refused", r"precision: checkpoint fp32 vs live bf16"),
    "dataset": ({"data_offset": 1.0}, "refused", r"data order: dataset_fingerprint: checkpoint '\w+' vs live '\w+'"),
    "loader type": ({"loader": "plain"}, "warned", r"DataLoader\) cannot resume exactly"),
    "learning rate": ({"lr": 0.02}, "warned", r"param_groups\[0\]\['initial_lr'\]: the checkpoint's 0.01 replaces the live 0.02"),
    "scheduler removed": ({"scheduler": "none"}, "refused", r"'scheduler' \(StepLR\) is in the checkpoint but not in the live run"),
    "scheduler class": ({"scheduler": "exponential"}, "refused", r"'scheduler': checkpoint StepLR vs live ExponentialLR"),
    "model width": ({"width": 9}, "refused", r"model\['0.weight'\]: checkpoint \(8, 6\) vs live \(9, 6\)"),
    "optimizer class": ({"optimizer": "sgd"}, "refused", r"optimizer: checkpoint AdamW .* vs live SGD"),
}


@pytest.mark.parametrize("case", list(MATRIX))
def test_each_change_is_exact_refused_before_applying_or_warned(payload, case):
    changes, outcome, pattern = MATRIX[case]
    result = resume_with(payload, **changes)
    if outcome == "refused":
        assert result["error"] is not None, f"{case}: accepted"
        message = str(result["error"])
        assert re.search(pattern, message), message
        assert "nothing was applied" in message and "To fix:" in message
        assert_same(result["before"], result["after"])  # refused before anything was applied
    else:
        assert result["error"] is None, f"{case}: {result['error']}"
        assert result["after"]["trainer"]["iteration"] == 6  # applied
        if outcome == "exact":
            assert result["warnings"] == []
        else:
                assert any(re.search(pattern, w) for w in result["warnings"]), result["warnings"]


def test_a_scheduler_added_on_resume_is_refused(payload):
    stripped = copy.deepcopy(payload)
    del stripped["stateful"]["scheduler"]
    stripped["meta"]["stateful_classes"].pop("scheduler")
    result = resume_with(stripped)
    assert "scheduler 'scheduler' (StepLR) is not in the checkpoint" in str(result["error"])
    assert_same(result["before"], result["after"])


def test_every_difference_is_listed_at_once(payload):
    result = resume_with(payload, seed=9, accumulation=1, precision="bf16", width=9)
    message = str(result["error"])
    for named in ("seed", "accumulation_steps", "precision", "model['0.weight']"):
        assert named in message, named
    assert "strict=False cannot accept the first kind" in message


def test_strict_false_accepts_an_inexact_resume_and_lists_what_differs(payload):
    result = resume_with(payload, strict=False, accumulation=1, precision="bf16", seed=8)
    assert result["error"] is None
    inexact = [w for w in result["warnings"] if w.startswith("resuming inexactly (strict=False)")]
    assert len(inexact) == 1
    for named in ("accumulation_steps: checkpoint 2 vs live 1", "precision: checkpoint fp32 vs live bf16", "seed"):
        assert named in inexact[0]
    assert result["after"]["trainer"]["optimizer_steps"] == 3


def test_strict_false_never_accepts_an_incompatible_checkpoint(payload):
    result = resume_with(payload, strict=False, width=9)
    assert isinstance(result["error"], CheckpointMismatchError)
    assert_same(result["before"], result["after"])


def test_shortening_below_the_saved_position_is_refused(payload):
    trainer, loader, scheduler = build()
    errors = []

    @trainer.on(Events.STARTED)
    def restore(engine):
        before = snapshot(engine, loader, scheduler)
        engine.state.max_epochs = 0  # as if the run asked for fewer epochs than the checkpoint has done
        with pytest.raises(CheckpointMismatchError, match=r"past the live max_epochs=0") as info:
            restore_training_state(engine, copy.deepcopy(payload))
        errors.append(info.value)
        engine.state.max_epochs = 2
        assert_same(before, snapshot(engine, loader, scheduler))
        engine.terminate()

    trainer.run(loader, max_epochs=2)
    assert errors


def test_rotation_strict_false_resumes_a_changed_run_end_to_end(tmp_path):
    trainer, loader, _ = build()
    CheckpointRotation(tmp_path, keep_last=1).attach(trainer)
    trainer.run(loader, max_epochs=1)
    trainer, loader, _ = build(accumulation=3)
    rotation = CheckpointRotation(tmp_path, keep_last=1, resume="auto", strict=False)
    rotation.attach(trainer)
    with pytest.warns(UserWarning, match=r"resuming inexactly .*accumulation_steps: checkpoint 2 vs live 3"):
        trainer.run(loader, max_epochs=2)
    assert trainer.state.resumed_from and trainer.state.optimizer_steps == 3 + 2
    trainer, loader, _ = build(accumulation=1)
    CheckpointRotation(tmp_path, keep_last=1, resume="auto").attach(trainer)
    with pytest.raises(Exception, match=r"accumulation_steps: checkpoint 3 vs live 1"):
        trainer.run(loader, max_epochs=3)
