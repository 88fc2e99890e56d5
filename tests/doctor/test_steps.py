"""Mistakes seen in the step log and at validations: trends, clipping, NaN, overfitting, eval mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.metrics import Loss

from engine_kit import StepEvents, create_evaluator
from handlers import NanGuard, StepLog, Validation
from tests.doctor.plant import learnable_batches, train
from tests.helpers import mlp


def test_flat_loss():
    doctor = train(optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.0), epochs=2)
    assert doctor.codes == ["loss-not-falling"]
    assert "the training loss stayed flat over the first 16 optimizer steps" in doctor.findings[0].evidence


def test_rising_loss():
    # Targets drift upwards faster than a small learning rate follows; L1 keeps the gradient norm constant.
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 2, generator=gen), torch.full((8, 1), 0.5 * k)) for k in range(16)]
    torch.manual_seed(0)
    doctor = train(torch.nn.Linear(2, 1), optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.01),
                   loss_fn=F.l1_loss, data=data)
    assert doctor.codes == ["loss-not-falling"]
    assert "the training loss rose over the first 16 optimizer steps" in doctor.findings[0].evidence


def test_gradient_norm_rising(tmp_path):
    # Minimizing -(w.x)^2: the loss keeps falling while the gradient grows with the weights.
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 2, generator=gen), torch.zeros(8, 1)) for _ in range(40)]
    torch.manual_seed(0)
    doctor = train(torch.nn.Linear(2, 1), optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.05),
                   loss_fn=lambda y_pred, y: -(y_pred ** 2).mean(), data=data,
                   before=StepLog(tmp_path / "steps.jsonl").attach)
    assert doctor.codes == ["grad-norm-rising"]
    assert "steady state taken as steps 9-40, after the first 20% of the 40-step run" in doctor.findings[0].evidence


def test_clipping_share(tmp_path):
    doctor = train(optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=0.01), data=learnable_batches(40),
                   max_grad_norm=0.01, before=StepLog(tmp_path / "steps.jsonl").attach)
    assert doctor.codes == ["clipping-share"]
    finding = doctor.findings[0]
    assert finding.evidence.startswith("100% of steady-state optimizer steps were clipped at max_grad_norm=0.01 "
                                       "(32 of 32; steady state taken as steps 9-40")
    assert "raise max_grad_norm to about" in finding.fix


def test_first_non_finite_step():
    data = learnable_batches(8)
    data[4] = (torch.full_like(data[4][0], float("nan")), data[4][1])
    with pytest.warns(RuntimeWarning, match="NanGuard"):
        doctor = train(data=data, before=NanGuard(check_every=1).attach)
    assert doctor.codes == ["non-finite"]
    evidence = doctor.findings[0].evidence
    assert evidence.startswith("step 5 is the first with a non-finite value: the loss (nan) went non-finite first")
    assert "param groups holding non-finite values now: 0" in evidence


def _random_labels(n_batches: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n_batches)]


def test_overfitting():
    # Random labels: the model memorizes 16 training samples; validation loss can only rise.
    model = mlp(hidden=64)
    evaluator = create_evaluator(model, metrics={"loss": Loss(F.cross_entropy)})
    validation = Validation(evaluator, _random_labels(4, seed=7))
    doctor = train(model, optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=0.03),
                   data=_random_labels(2, seed=1), epochs=12, before=validation.attach)
    assert doctor.codes == ["overfitting"]
    assert "validation loss rose 3 times in a row" in doctor.findings[0].evidence
    assert "use the model of validation" in doctor.findings[0].fix


def test_model_left_in_eval_mode():
    model = torch.nn.Sequential(mlp(), torch.nn.Dropout(0.1))

    def careless_probe(trainer):
        @trainer.on(StepEvents.OPTIMIZER_STEP_COMPLETED(every=3))
        def look(engine):
            model.eval()  # and never model.train()

    doctor = train(model, before=careless_probe)
    assert doctor.codes == ["eval-mode"]
    assert "at the end of epoch 1 (optimizer step 8)" in doctor.findings[0].evidence
