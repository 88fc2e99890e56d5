"""CUDA paths of the step (acceptance 7): bf16, fp16 + GradScaler, no host sync.

Skipped without CUDA; run on a GPU machine with `pytest tests/test_step_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine_kit import StepEvents, create_trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cuda_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).cuda()


def cuda_batches(n=8, batch=16):
    gen = torch.Generator(device="cuda").manual_seed(0)
    return [
        (torch.randn(batch, 32, device="cuda", generator=gen), torch.randint(0, 10, (batch,), device="cuda", generator=gen))
        for _ in range(n)
    ]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run(precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    model = cuda_model()
    trainer = create_trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), F.cross_entropy,
                             device="cuda", precision=precision, accumulation_steps=2, max_grad_norm=1.0)
    losses = []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda e: losses.append(e.state.output.loss.item()))
    trainer.run(cuda_batches(), max_epochs=3)
    assert trainer.state.optimizer_steps + trainer.state.skipped_steps == 12
    assert trainer.state.scaler.is_enabled() == (precision == "fp16")
    assert losses[-1] < losses[0]


def test_bf16_steady_state_never_syncs_with_the_host():
    if not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    model = cuda_model()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=1e-2), F.cross_entropy,
                             device="cuda", precision="bf16", accumulation_steps=2, max_grad_norm=1.0)
    data = cuda_batches()
    trainer.run(data, max_epochs=1)  # warm-up: first-window bookkeeping reads the sample count once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.run(data, max_epochs=3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert trainer.state.optimizer_steps == 12


def test_fp16_forced_overflow_skips_the_step():
    model = cuda_model()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=1e-2), F.mse_loss,
                             device="cuda", precision="fp16", max_grad_norm=1.0)
    skipped = []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_SKIPPED, lambda e: skipped.append(e.state.skipped_steps))
    x = torch.randn(16, 32, device="cuda")
    y = torch.full((16, 10), 1e30, device="cuda")  # squared error overflows fp16 gradients
    before = [p.detach().clone() for p in model.parameters()]
    trainer.run([(x, y)], max_epochs=1)
    assert skipped == [1] and trainer.state.skipped_steps == 1 and trainer.state.optimizer_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
