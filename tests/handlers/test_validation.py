"""Validation: schedule, history, events, train mode afterwards, refusals and overlap warnings."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from ignite.metrics import MeanSquaredError
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Subset, TensorDataset

from engine_kit import create_evaluator, create_trainer
from engine_kit.data_order import ResumableLoader
from handlers.events import ValidationEvents
from handlers.validation import Validation
from tests.helpers import mlp, regression_batches


def make(accumulation: int = 1, dropout: bool = False):
    model = mlp(in_features=2, out=1)
    if dropout:
        model = torch.nn.Sequential(model, torch.nn.Dropout(0.1))
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), F.mse_loss,
                             accumulation_steps=accumulation)
    evaluator = create_evaluator(model, metrics={"mse": MeanSquaredError()})
    return model, trainer, evaluator


def dataset(n: int = 16) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 2, generator=gen), torch.randn(n, 1, generator=gen))


def test_every_steps_counts_optimizer_steps():
    _, trainer, evaluator = make(accumulation=2)
    validation = Validation(evaluator, regression_batches(8, 4, seed=5), every_steps=3)
    validation.attach(trainer)
    fired = []
    trainer.add_event_handler(ValidationEvents.VALIDATION_COMPLETED, lambda e: fired.append(e.state.validations))
    state = trainer.run(regression_batches(40, 4), max_epochs=2)  # 2 epochs x 10 batches, acc 2 -> 10 steps
    assert state.optimizer_steps == 10
    assert fired == [1, 2, 3]
    assert [v["optimizer_steps"] for v in state.val_history] == [3, 6, 9]
    assert [v["epoch"] for v in state.val_history] == [1, 2, 2]
    assert [v["validation"] for v in state.val_history] == [1, 2, 3]


def test_every_epochs_and_the_default_validate_each_epoch():
    for kwargs in ({"every_epochs": 1}, {}):
        _, trainer, evaluator = make(accumulation=2)
        Validation(evaluator, regression_batches(8, 4, seed=5), **kwargs).attach(trainer)
        state = trainer.run(regression_batches(40, 4), max_epochs=2)
        assert state.validations == 2
        assert [(v["epoch"], v["optimizer_steps"]) for v in state.val_history] == [(1, 5), (2, 10)]
    _, trainer, evaluator = make()
    Validation(evaluator, regression_batches(8, 4), every_epochs=2).attach(trainer)
    assert trainer.run(regression_batches(8, 4), max_epochs=5).validations == 2


def test_metrics_are_floats_and_match_a_direct_evaluation():
    model, trainer, evaluator = make()
    val_data = regression_batches(8, 4, seed=5)
    validation = Validation(evaluator, val_data)
    validation.attach(trainer)
    state = trainer.run(regression_batches(16, 4), max_epochs=1)
    with torch.no_grad():
        x = torch.cat([b[0] for b in val_data])
        y = torch.cat([b[1] for b in val_data])
        expected = F.mse_loss(model(x), y).item()
    assert isinstance(state.val_metrics["mse"], float)
    assert state.val_metrics["mse"] == pytest.approx(expected, rel=1e-5)
    assert validation.latest == {"validation": 1, "epoch": 1, "optimizer_steps": 4, "mse": state.val_metrics["mse"]}


def test_model_is_back_in_train_mode_after_each_validation():
    model, trainer, evaluator = make(dropout=True)
    Validation(evaluator, regression_batches(8, 4), every_steps=2).attach(trainer)
    modes = {"during": [], "after": [], "next_iteration": []}
    evaluator.add_event_handler(Events.ITERATION_STARTED, lambda: modes["during"].append(model.training))
    trainer.add_event_handler(ValidationEvents.VALIDATION_COMPLETED, lambda: modes["after"].append(model.training))
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda: modes["next_iteration"].append(model.training))
    trainer.run(regression_batches(24, 4), max_epochs=1)
    assert modes["during"] and not any(modes["during"])
    assert modes["after"] == [True, True, True]
    assert all(modes["next_iteration"]) and model.training


def test_shuffled_validation_loader_is_refused():
    _, _, evaluator = make()
    data = dataset()
    shuffled = [
        DataLoader(data, batch_size=4, shuffle=True),
        DataLoader(data, batch_sampler=BatchSampler(RandomSampler(data), batch_size=4, drop_last=False)),
        ResumableLoader(data, batch_size=4, shuffle=True),
    ]
    for loader in shuffled:
        with pytest.raises(ValueError, match="shuffles.*To fix: build the validation loader with shuffle=False"):
            Validation(evaluator, loader)
    Validation(evaluator, DataLoader(data, batch_size=4))  # in order: accepted
    Validation(evaluator, ResumableLoader(data, batch_size=4, shuffle=False))


def test_overlap_warnings():
    _, _, evaluator = make()
    base = dataset(20)
    train = Subset(base, list(range(0, 12)))
    with pytest.warns(UserWarning, match="overlap: 20 validation samples"):
        Validation(evaluator, DataLoader(base, batch_size=4), train_data=DataLoader(base, batch_size=4))
    with pytest.warns(UserWarning, match="overlap: 2 validation samples"):
        Validation(evaluator, DataLoader(Subset(base, list(range(10, 20))), batch_size=4), train_data=train)
    # Nested: positions 2..5 of Subset(base, 8..19) are base indices 10..13, inside `train`.
    nested = Subset(Subset(base, list(range(8, 20))), [2, 3, 4, 5])
    with pytest.warns(UserWarning, match="overlap: 2 validation samples"):
        Validation(evaluator, DataLoader(nested, batch_size=4), train_data=train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Validation(evaluator, DataLoader(Subset(base, list(range(12, 20))), batch_size=4), train_data=train)
        Validation(evaluator, DataLoader(Subset(Subset(base, list(range(8, 20))), [4, 5]), batch_size=4),
                   train_data=DataLoader(train, batch_size=4))
        Validation(evaluator, DataLoader(dataset(8), batch_size=4), train_data=base)  # another dataset


def test_overlap_with_the_run_data_warns_once_at_start():
    _, trainer, evaluator = make()
    base = dataset(16)
    Validation(evaluator, DataLoader(Subset(base, range(8, 16)), batch_size=4)).attach(trainer)
    with pytest.warns(UserWarning, match="overlap: 8 validation samples") as record:
        trainer.run(DataLoader(base, batch_size=4), max_epochs=2)
    assert sum("overlap" in str(w.message) for w in record) == 1


def test_history_round_trips_and_restores_the_trainer():
    _, trainer, evaluator = make()
    first = Validation(evaluator, regression_batches(8, 4))
    first.attach(trainer)
    trainer.run(regression_batches(8, 4), max_epochs=2)
    saved = first.state_dict()
    _, resumed, evaluator2 = make()
    second = Validation(evaluator2, regression_batches(8, 4))
    second.attach(resumed)
    second.load_state_dict(saved)
    assert second.state_dict() == saved
    assert resumed.state.val_history == saved["history"] and resumed.state.validations == 2
    assert resumed.state.val_metrics == {"mse": saved["history"][-1]["mse"]}
    with pytest.raises(ValueError, match="unexpected keys \\['extra'\\].*To fix"):
        second.load_state_dict({**saved, "extra": 1})


def test_bad_options_and_double_attach():
    _, trainer, evaluator = make()
    data = regression_batches(8, 4)
    with pytest.raises(ValueError, match="both given.*To fix"):
        Validation(evaluator, data, every_epochs=1, every_steps=5)
    with pytest.raises(ValueError, match="every_steps=0 is below 1"):
        Validation(evaluator, data, every_steps=0)
    with pytest.raises(TypeError, match="every_epochs=1.5 is not an integer"):
        Validation(evaluator, data, every_epochs=1.5)
    with pytest.raises(TypeError, match="create_evaluator"):
        Validation(object(), data)
    with pytest.raises(RuntimeError, match="StepEvents.OPTIMIZER_STEP_COMPLETED"):
        Validation(evaluator, data, every_steps=2).attach(evaluator)
    validation = Validation(evaluator, data)
    validation.attach(trainer)
    with pytest.raises(RuntimeError, match="already attached"):
        validation.attach(trainer)
