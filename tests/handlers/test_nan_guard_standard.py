"""NanGuard inside attach_standard: read every log_every optimizer steps, whatever the accumulation."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from ignite.metrics import Accuracy

import handlers.nan_guard as nan_guard_module
from engine_kit import create_evaluator, create_trainer
from engine_kit.checkpoint import CheckpointDirectory
from engine_kit.stateful import save_refusal
from handlers import attach_standard
from tests.helpers import classification_batches, mlp

TRAIN = classification_batches(24, 8)  # 24 micro-batches: 6 optimizer steps per epoch at accumulation 4
VAL = classification_batches(2, 8, seed=2)


def nan_from(k):
    """cross_entropy that turns NaN from the k-th call (micro-batch) on."""
    calls = []

    def loss_fn(y_pred, y):
        calls.append(None)
        loss = F.cross_entropy(y_pred, y)
        return loss * float("nan") if len(calls) >= k else loss  # a NaN loss and NaN gradients

    return loss_fn


def standard_trainer(tmp_path, loss_fn, **options):
    model = mlp()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, accumulation_steps=4)
    evaluator = create_evaluator(model, metrics={"accuracy": Accuracy()})
    stack = attach_standard(trainer, evaluator, VAL, run_dir=tmp_path, doctor=False, async_save=False, **options)
    return model, trainer, stack


def test_log_every_counts_optimizer_steps_for_the_guard_too(tmp_path, monkeypatch):
    _, trainer, stack = standard_trainer(tmp_path, F.cross_entropy, log_every=2, checkpoint_every_steps=None)
    assert stack.nan_guard.check_every == 8  # 2 optimizer steps of 4 micro-batches
    checked, reread = [], []
    read_and_finite = nan_guard_module._read_and_finite
    monkeypatch.setattr(nan_guard_module, "_read_and_finite", lambda pending: checked.append(
        sum(len(item.losses) + (item.norm is not None) for item in pending)) or read_and_finite(pending))
    first_non_finite = nan_guard_module._first_non_finite
    monkeypatch.setattr(nan_guard_module, "_first_non_finite", lambda values: reread.append(values) or first_non_finite(values))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.run(TRAIN, max_epochs=1)
    # Periodic reads at iterations 8, 16 and 24 only (the epoch end and the run end find nothing
    # pending): each over 8 losses and the 2 norms of the steps in between.
    assert checked == [10, 10, 10]
    # All finite: the values the loggers read served the guard, which read no tensor itself.
    assert reread == []


def test_a_nan_inside_a_window_is_named_and_vetoes_the_save_of_that_window(tmp_path):
    # NaN from micro-batch 6: the second of window 2 (iterations 5-8), which steps at iteration 8.
    model, trainer, stack = standard_trainer(tmp_path, nan_from(6), log_every=50, checkpoint_every_steps=1,
                                             keep_last=10, keep_best=0)
    assert stack.nan_guard.check_every == 200  # no periodic read in this run: only the veto can stop it
    with pytest.warns(RuntimeWarning, match="at iteration 6"):
        state = trainer.run(TRAIN, max_epochs=1)
    assert state.iteration == 8 and state.optimizer_steps == 2  # stopped by the veto of step 2's save
    assert state.stopped_by == "NanGuard: non-finite loss or gradient norm at iteration 6"
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # step 2 did apply the NaN
    assert save_refusal(trainer) is not None
    directory = CheckpointDirectory(tmp_path / "checkpoints", read_only=True)
    newest = directory.newest_valid()
    assert newest.step == 1  # the NaN model was never saved
    assert all(torch.isfinite(t).all() for t in directory.load(newest)["model"].values())


def test_a_nan_found_in_the_loggers_reads_is_named_by_its_own_micro_batch(tmp_path, monkeypatch):
    # NaN from micro-batch 11 (window 3: iterations 9-12). The loggers read steps 3-4 at iteration 16; the guard's
    # periodic check right after sees a non-finite window mean there and reads that window's losses one by one.
    _, trainer, stack = standard_trainer(tmp_path, nan_from(11), log_every=2, checkpoint_every_steps=None)
    reread = []
    first_non_finite = nan_guard_module._first_non_finite
    monkeypatch.setattr(nan_guard_module, "_first_non_finite", lambda values: reread.append(len(values)) or first_non_finite(values))
    with pytest.warns(RuntimeWarning, match="at iteration 11"):
        state = trainer.run(TRAIN, max_epochs=1)
    assert state.iteration == 16 and state.stopped_by == "NanGuard: non-finite loss or gradient norm at iteration 11"
    assert reread == [10]  # once, at that check: its 8 losses and 2 norms (the check at iteration 8 read nothing)
