"""NanGuard with CheckpointRotation: the last good checkpoint stays the newest (handlers acceptance 6)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import pytest

from engine_kit import create_trainer
from engine_kit.checkpoint import CheckpointDirectory
from handlers import CheckpointRotation, NanGuard
from tests.helpers import mlp, regression_batches


def test_nan_run_stops_and_the_newest_checkpoint_is_the_last_good_one(tmp_path):
    model = mlp(in_features=2, out=1)
    calls = {"n": 0}

    def loss_fn(y_pred, y):
        calls["n"] += 1
        loss = F.mse_loss(y_pred, y)
        return loss * float("nan") if calls["n"] >= 7 else loss  # NaN from iteration 7 on

    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), loss_fn)
    NanGuard(check_every=4).attach(trainer)
    CheckpointRotation(tmp_path, every_steps=1, keep_last=3).attach(trainer)
    with pytest.warns(UserWarning, match="not saving"):
        trainer.run(regression_batches(80, 4), max_epochs=1)  # 20 iterations available
    assert trainer.state.iteration < 20  # stopped early
    assert "NanGuard" in trainer.state.stopped_by
    directory = CheckpointDirectory(tmp_path, read_only=True)
    newest = directory.newest_valid()
    assert newest.step == 6  # the last step before the NaN loss
    payload = directory.load(newest)
    assert all(torch.isfinite(t).all() for t in payload["model"].values())
    assert math.isnan(next(iter(model.parameters())).sum().item())  # the live model did go NaN
