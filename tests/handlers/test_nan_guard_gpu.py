"""On CUDA: NanGuard's one read per check and the doctor's stacked digests (skipped without a GPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import engine_kit.doctor.item_digests as data_checks
from engine_kit import create_trainer
from handlers.nan_guard import NanGuard, _first_non_finite
from tests.helpers import mlp, regression_batches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_first_non_finite_on_cuda_values():
    values = [torch.tensor(v, device="cuda") for v in (1.0, 2.0, float("nan"), float("inf"))]
    assert _first_non_finite(values) == 2
    assert _first_non_finite(values[:2]) is None
    mixed = [torch.tensor(1.0, device="cuda", dtype=torch.bfloat16), torch.tensor(float("inf"), device="cuda")]
    assert _first_non_finite(mixed) == 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_nan_inside_a_window_is_named_on_cuda(precision):
    calls = []

    def loss_fn(y_pred, y):
        calls.append(None)
        loss = F.mse_loss(y_pred.float(), y)
        return loss * float("nan") if len(calls) == 6 else loss

    model = mlp(in_features=2, out=1).cuda()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, device="cuda",
                             precision=precision, accumulation_steps=4)
    NanGuard(check_every=8).attach(trainer)
    data = [(x.cuda(), y.cuda()) for x, y in regression_batches(80, 4)]
    with warnings.catch_warnings(record=True):
        state = trainer.run(data, max_epochs=1)
    assert state.nan_detected and state.stopped_by.endswith("at iteration 6") and state.iteration == 8


def test_digests_of_cuda_tensors_equal_those_of_their_host_copies():
    gen = torch.Generator().manual_seed(0)
    host = [torch.randn(3, 5, generator=gen) for _ in range(6)] + [torch.randn(2, generator=gen).bfloat16()] * 2
    device = [t.cuda() for t in host]
    assert data_checks._digests(device) == data_checks._digests(host)
    assert data_checks._digests(device) == [data_checks._item_digest(t) for t in host]
