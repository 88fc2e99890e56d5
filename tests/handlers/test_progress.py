"""ProgressBar: runs on a tiny trainer, shows loss and lr, reads the loss once per N iterations."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from engine_kit import create_evaluator, create_trainer
from handlers.progress import ProgressBar
from tests.helpers import mlp, regression_batches


def make(accumulation: int = 1):
    model = mlp(in_features=2, out=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, create_trainer(model, opt, F.mse_loss, accumulation_steps=accumulation)


def test_postfix_shows_the_mean_loss_of_the_last_n_iterations():
    _, trainer = make(accumulation=2)
    out = io.StringIO()
    bar = ProgressBar(every=3, file=out, mininterval=0)
    bar.attach(trainer)
    losses, shown = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output.loss.item()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=3), lambda: shown.append(dict(bar.postfix)))
    trainer.run(regression_batches(32, 4), max_epochs=2)  # 8 iterations per epoch
    for k, postfix in enumerate(shown):  # iterations 3k+1 .. 3k+3, across the epoch boundary too
        assert postfix["loss"] == pytest.approx(sum(losses[3 * k : 3 * k + 3]) / 3, rel=1e-6)
    assert all(s["lr"] == 0.05 for s in shown)
    assert bar.reads == 16 // 3
    assert "loss=" in out.getvalue() and "lr=" in out.getvalue()


def test_loss_is_read_at_most_once_per_n_iterations(monkeypatch):
    _, trainer = make()
    calls = {"item": 0, "tolist": 0}
    item, tolist = torch.Tensor.item, torch.Tensor.tolist

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    ProgressBar(every=5, disable=True).attach(trainer)
    monkeypatch.setattr(torch.Tensor, "item", counting("item", item))
    monkeypatch.setattr(torch.Tensor, "tolist", counting("tolist", tolist))
    trainer.run(regression_batches(80, 4), max_epochs=1)  # 20 iterations
    monkeypatch.undo()
    assert calls["item"] + calls["tolist"] == 20 // 5


def test_evaluator_bar_and_state():
    model, _ = make()
    evaluator = create_evaluator(model)
    bar = ProgressBar(every=1, disable=True)
    bar.attach(evaluator)
    evaluator.run(regression_batches(8, 4))
    assert bar.reads == 0 and bar.postfix == {}  # evaluator outputs carry no loss
    assert bar.state_dict() == {}
    bar.load_state_dict({})
    with pytest.raises(ValueError, match="unexpected keys"):
        bar.load_state_dict({"x": 1})


def test_bad_options_and_double_attach():
    with pytest.raises(ValueError, match="every=0 is below 1"):
        ProgressBar(every=0)
    with pytest.raises(TypeError, match="persist='yes' is not a bool"):
        ProgressBar(persist="yes")
    _, trainer = make()
    bar = ProgressBar(disable=True)
    bar.attach(trainer)
    with pytest.raises(RuntimeError, match="already attached"):
        bar.attach(trainer)


def test_the_losses_are_combined_once_per_update(monkeypatch):
    _, trainer = make()
    bar = ProgressBar(every=4, disable=True)
    bar.attach(trainer)
    stacks = []
    stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda tensors, *a, **k: stacks.append(len(tensors)) or stack(tensors, *a, **k))
    trainer.run(regression_batches(40, 4), max_epochs=1)  # 10 iterations: updates at 4 and 8
    monkeypatch.undo()
    assert stacks == [4, 4] and bar.reads == 2  # one stack of the 4 losses per update, none per iteration
