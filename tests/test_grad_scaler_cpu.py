"""The fp16 + GradScaler path, exercised on CPU (torch has fp16 autocast and a GradScaler for CPU).

The public API refuses fp16 on CPU (it is slow and pointless there), so these
tests resolve precision to fp16-on-CPU by hand; the GPU file repeats the
overflow check on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import engine_kit.trainer as trainer_module
from engine_kit import StepEvents, create_trainer
from engine_kit.precision import Precision
from tests.helpers import mlp, regression_batches


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    monkeypatch.setattr(trainer_module, "resolve_precision", lambda precision, device: Precision("fp16", "cpu"))


def test_forced_overflow_skips_the_step_and_leaves_parameters(fp16_on_cpu):
    model = mlp(in_features=2, out=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, opt, F.mse_loss, precision="fp16", max_grad_norm=1.0)
    assert trainer.state.scaler.is_enabled()
    events = []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_SKIPPED, lambda: events.append("skipped"))
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda: events.append("stepped"))
    lr_seen = []
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda: sched.step())
    x, y = regression_batches(4, 4)[0]
    poisoned = (x, torch.full_like(y, float("inf")))
    before = [p.detach().clone() for p in model.parameters()]
    trainer.run([poisoned], max_epochs=1)
    lr_seen.append(opt.param_groups[0]["lr"])
    assert events == ["skipped"]
    assert trainer.state.skipped_steps == 1 and trainer.state.optimizer_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert lr_seen == [0.1]  # the scheduler did not advance on the skipped step
    assert trainer.state.output.stepped is False


def test_gradients_ready_sees_unscaled_gradients(fp16_on_cpu):
    batches = regression_batches(8, 4)
    ours = mlp(in_features=2, out=1)
    trainer = create_trainer(ours, torch.optim.SGD(ours.parameters(), lr=0.1), F.mse_loss, precision="fp16",
                             accumulation_steps=2)
    seen = []
    trainer.add_event_handler(StepEvents.GRADIENTS_READY, lambda: seen.append([p.grad.clone() for p in ours.parameters()]))
    trainer.run(batches, max_epochs=1)
    reference = mlp(in_features=2, out=1)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.mse_loss(reference(x), y)
    loss.backward()
    assert trainer.state.scaler.get_scale() == 65536.0  # backward ran on gradients scaled 65536 times
    for got, want in zip(seen[0], [p.grad for p in reference.parameters()]):
        # Unscaled: the same magnitude as the fp16 reference (not 65536 times larger).
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
    assert trainer.state.optimizer_steps == 1
