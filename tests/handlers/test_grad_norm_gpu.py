"""With fp16 on CUDA, GradNormLogger logs the unscaled norm (handlers acceptance 1, GPU part)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine_kit import create_trainer
from handlers import GradNormLogger

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fp16_logged_norm_is_unscaled():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).cuda()
    reference = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).cuda()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 16, device="cuda")
    y = torch.randint(0, 4, (8,), device="cuda")
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), F.cross_entropy,
                             device="cuda", precision="fp16", max_grad_norm=0.1)
    logger = GradNormLogger(flush_every=1)
    logger.attach(trainer)
    trainer.run([(x, y)], max_epochs=1)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = F.cross_entropy(reference(x), y)
    loss.backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]).item()
    (step, logged), = logger.norms
    assert trainer.state.scaler.get_scale() > 1000  # the backward really ran scaled
    assert logged == pytest.approx(expected, rel=1e-2)
    assert logger.clipped_fraction == (1.0 if expected > 0.1 else 0.0)
