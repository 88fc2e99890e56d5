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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overlap_count_of_cuda_inputs_equals_that_of_their_host_copies(dtype):
    from engine_kit.doctor.item_digests import count_identical

    gen = torch.Generator().manual_seed(0)
    train = [(torch.randn(3, 5, generator=gen).to(dtype), 0) for _ in range(12)]
    val = [train[2], train[7], (torch.randn(3, 5, generator=gen).to(dtype), 0)]

    def on_cuda(items):
        return [(x.cuda(), y) for x, y in items]

    assert count_identical(on_cuda(train), on_cuda(val), 256, 4096) == count_identical(train, val, 256, 4096) == (2, 3, 12)
