"""Evaluation mode, inference mode and the trainer's mode afterwards (acceptance 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ignite.engine import Events
from ignite.metrics import Accuracy

from engine_kit import create_evaluator, create_trainer
from tests.helpers import classification_batches


class Recorder(torch.nn.Module):
    """A model with Dropout and BatchNorm that records the mode of every forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)
        )
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return self.net(x)


def test_evaluator_runs_in_eval_and_inference_mode_and_restores_train():
    model = Recorder()
    data = classification_batches(3, 8)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy)
    evaluator = create_evaluator(model, metrics={"acc": Accuracy()})
    bn = model.net[1]
    stats_during_eval = []

    @trainer.on(Events.ITERATION_COMPLETED(once=2))
    def validate():
        before = bn.running_mean.clone()
        evaluator.run(data)
        stats_during_eval.append(torch.equal(before, bn.running_mean))

    trainer.run(data, max_epochs=1)
    train_calls = [c for c in model.calls if c[0]]
    eval_calls = [c for c in model.calls if not c[0]]
    assert len(eval_calls) == 3 and all(c == (False, True, False) for c in eval_calls)
    # Iteration 3 ran after validation: back in train mode with autograd on.
    assert model.calls[-1] == (True, False, True)
    assert len(train_calls) == 3
    assert stats_during_eval == [True]  # BatchNorm statistics untouched by evaluation
    assert 0.0 <= evaluator.state.metrics["acc"] <= 1.0


def test_evaluator_restores_eval_mode_when_model_was_in_eval():
    model = Recorder()
    model.eval()
    create_evaluator(model).run(classification_batches(1, 4))
    assert model.training is False


def test_evaluator_restores_mode_after_a_failure():
    model = Recorder()
    model.train()
    evaluator = create_evaluator(model)
    bad = [(torch.randn(4, 5), torch.zeros(4))]  # wrong feature count -> forward fails
    try:
        evaluator.run(bad)
    except RuntimeError:
        pass
    assert model.training is True
