"""The window weight keeps its bits: a float32 loss weighted through the step's cached tensor equals ``loss * float``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine_kit import create_trainer
from tests.helpers import classification_batches, mlp


def weighted_reference(model, batches, *, accumulation, loss_fn, epochs):
    """A plain loop weighting each micro-batch by ``n / (window length * n)`` as a Python float."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for start in range(0, len(batches), accumulation):
            window = batches[start:start + accumulation]
            for x, y in window:
                n = y.shape[0]
                loss = loss_fn(model(x), y)
                (loss * (n / (len(window) * float(n)))).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def bf16_loss(y_pred, y):
    return F.cross_entropy(y_pred, y).to(torch.bfloat16)


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, bf16_loss], ids=["float32-loss", "bfloat16-loss"])
def test_window_weights_equal_the_float_weights_bit_for_bit(loss_fn):
    # Accumulation 3 (weight 1/3, not a power of two) and 11 batches: each epoch ends with
    # a ragged window of 2 (weight 1/2), so the cached weight changes and comes back.
    batches = classification_batches(n_batches=11, batch_size=5)
    ref, ours = mlp(), mlp()
    weighted_reference(ref, batches, accumulation=3, loss_fn=loss_fn, epochs=2)
    trainer = create_trainer(ours, torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9), loss_fn,
                             accumulation_steps=3)
    trainer.run(batches, max_epochs=2)
    assert trainer.state.optimizer_steps == 8
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)


def test_a_weight_tensor_saved_for_backward_is_never_changed_in_place():
    # The cached tensor is part of the graph of every micro-batch that used it; a new
    # weight must get a new tensor, never overwrite the one an earlier graph saved.
    model = mlp()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                             accumulation_steps=3)
    step = trainer.step
    first = step._weight_tensor(1 / 3)
    assert step._weight_tensor(1 / 3) is first
    second = step._weight_tensor(0.5)
    assert second is not first and first.item() == pytest.approx(1 / 3) and second.item() == 0.5
