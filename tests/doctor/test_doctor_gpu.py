"""On CUDA: the doctor adds no host sync to steady-state iterations (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from engine_kit import create_trainer
from handlers import Doctor
from tests.doctor.plant import learnable_batches
from tests.helpers import mlp

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_steady_state_iterations_do_not_sync(precision):
    model = mlp().cuda()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), F.cross_entropy,
                             device="cuda", precision=precision)

    @trainer.on(Events.ITERATION_COMPLETED(once=40))  # after the probed batches and the timed fetches
    def strict(_):
        torch.cuda.set_sync_debug_mode("error")

    @trainer.on(Events.EPOCH_COMPLETED)  # attached before the doctor: its epoch-end read is allowed
    def relaxed(_):
        torch.cuda.set_sync_debug_mode(0)

    doctor = Doctor()
    doctor.attach(trainer)
    data = [(x.cuda(), y.cuda()) for x, y in learnable_batches(80)]
    try:
        trainer.run(data, max_epochs=1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert doctor.codes == []
    assert not doctor._handles.keys() - {"record"}  # only the step recorder (no StepLog here) stays
