"""Every user mistake gets a typed error naming the value and saying "To fix:" (acceptance 8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine_kit import create_evaluator, create_trainer
from tests.helpers import mlp, regression_batches


def trainer_for(**kwargs):
    model = kwargs.pop("model", None) or mlp(in_features=2, out=1)
    opt = kwargs.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = kwargs.pop("loss_fn", F.mse_loss)
    return create_trainer(model, opt, loss_fn, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"accumulation_steps": 0}, ValueError, r"accumulation_steps=0 .*To fix:"),
        ({"accumulation_steps": -3}, ValueError, r"accumulation_steps=-3 .*To fix:"),
        ({"accumulation_steps": 2.5}, TypeError, r"accumulation_steps=2.5 .*To fix:"),
        ({"max_grad_norm": 0}, ValueError, r"max_grad_norm=0 .*To fix:"),
        ({"max_grad_norm": -1.0}, ValueError, r"max_grad_norm=-1.0 .*To fix:"),
        ({"max_grad_norm": float("nan")}, ValueError, r"max_grad_norm=nan .*To fix:"),
        ({"max_grad_norm": "1"}, TypeError, r"max_grad_norm='1' .*To fix:"),
        ({"precision": "fp8"}, ValueError, r"precision='fp8' .*To fix:"),
        ({"precision": "fp16"}, ValueError, r"precision='fp16' needs a CUDA device.*To fix:"),
        ({"device": "tpu9"}, ValueError, r"device='tpu9'.*To fix:"),
    ],
)
def test_bad_options_are_refused_at_construction(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        trainer_for(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda():
    with pytest.raises(ValueError, match=r"device='cuda' but CUDA is not available.*To fix:"):
        trainer_for(device="cuda")


def test_evaluator_refuses_unknown_precision():
    with pytest.raises(ValueError, match=r"precision='half'.*To fix:"):
        create_evaluator(mlp(), precision="half")


def test_loss_that_is_not_a_scalar():
    trainer = trainer_for(loss_fn=lambda y_pred, y: F.mse_loss(y_pred, y, reduction="none"))
    with pytest.raises(Exception, match=r"shape \(4, 1\), not a scalar.*To fix:") as info:
        trainer.run(regression_batches(8, 4), max_epochs=1)
    assert isinstance(info.value, ValueError)


def test_loss_that_is_not_a_tensor():
    trainer = trainer_for(loss_fn=lambda y_pred, y: 0.5)
    with pytest.raises(TypeError, match=r"loss_fn returned a float.*To fix:"):
        trainer.run(regression_batches(8, 4), max_epochs=1)


def test_loss_without_grad():
    trainer = trainer_for(loss_fn=lambda y_pred, y: F.mse_loss(y_pred.detach(), y))
    with pytest.raises(ValueError, match=r"does not require grad.*To fix:"):
        trainer.run(regression_batches(8, 4), max_epochs=1)


def test_batch_that_is_not_a_pair():
    trainer = trainer_for()
    triples = [(torch.randn(4, 2), torch.randn(4, 1), torch.zeros(4))]
    with pytest.raises(TypeError, match=r"tuple of length 3.*\(x, y\) pair.*To fix:.*prepare_batch"):
        trainer.run(triples, max_epochs=1)
    with pytest.raises(TypeError, match=r"batch is a Tensor.*To fix:"):
        trainer_for().run([torch.randn(4, 2)], max_epochs=1)


def test_custom_prepare_batch_accepts_other_layouts():
    trainer = trainer_for(prepare_batch=lambda batch, device, nb: (batch["x"], batch["y"]))
    data = [{"x": x, "y": y} for x, y in regression_batches(8, 4)]
    assert trainer.run(data, max_epochs=1).optimizer_steps == 2


def test_optimizer_of_another_model():
    model = mlp(in_features=2, out=1)
    other = mlp(in_features=2, out=1)
    with pytest.raises(ValueError, match=r"not parameters of the model.*To fix:"):
        trainer_for(model=model, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))


def test_optimizer_missing_some_parameters_warns():
    model = mlp(in_features=2, out=1)
    with pytest.warns(UserWarning, match="not in the optimizer"):
        trainer_for(model=model, optimizer=torch.optim.SGD(model[0].parameters(), lr=0.1))


def test_wrong_types_for_model_and_optimizer():
    model = mlp(in_features=2, out=1)
    with pytest.raises(TypeError, match="model is a str.*To fix:"):
        create_trainer("net", torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss)
    with pytest.raises(TypeError, match="optimizer is a dict.*To fix:"):
        create_trainer(model, {}, F.mse_loss)
