"""The trainer equals a plain PyTorch loop written out here (acceptance 1, 2, 4)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from engine_kit import StepEvents, create_trainer
from tests.helpers import classification_batches, max_param_diff, mlp, regression_batches


def reference_loop(model, batches, *, accumulation, max_norm, epochs, lr=0.1):
    """The textbook loop: loss / accumulation, clip, step, scheduler per step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    norms = []
    for _ in range(epochs):
        for i, (x, y) in enumerate(batches):
            loss = F.cross_entropy(model(x), y) / accumulation
            loss.backward()
            if (i + 1) % accumulation == 0:
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
    return norms


def engine_run(model, batches, *, accumulation, max_norm, epochs, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    trainer = create_trainer(
        model, opt, F.cross_entropy, accumulation_steps=accumulation, max_grad_norm=max_norm
    )
    norms = []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda: sched.step())
    trainer.add_event_handler(
        StepEvents.OPTIMIZER_STEP_COMPLETED, lambda e: norms.append(e.state.output.grad_norm.item())
    )
    trainer.run(batches, max_epochs=epochs)
    return trainer, norms


@pytest.mark.parametrize("accumulation", [1, 4])
def test_oracle_equality_with_plain_loop(accumulation):
    batches = classification_batches(n_batches=8, batch_size=6)
    ref, ours = mlp(), mlp()
    ref_norms = reference_loop(ref, batches, accumulation=accumulation, max_norm=0.5, epochs=2)
    trainer, our_norms = engine_run(ours, batches, accumulation=accumulation, max_norm=0.5, epochs=2)
    assert trainer.state.optimizer_steps == len(ref_norms) == 2 * 8 // accumulation
    assert max_param_diff(ref, ours) <= 1e-6
    # The clip threshold was really hit, so clipping was exercised.
    assert max(ref_norms) > 0.5
    # grad_norm is the pre-clip norm (acceptance 4).
    assert our_norms == pytest.approx(ref_norms, rel=1e-5, abs=1e-7)


def large_batch_step(model, window, lr):
    """One SGD step on the mean loss over every sample of the window."""
    x = torch.cat([b[0] for b in window])
    y = torch.cat([b[1] for b in window])
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def test_ragged_tail_window_equals_large_batch_mean():
    batches = regression_batches(n_samples=40, batch_size=4)  # 10 batches
    ref, ours = mlp(in_features=2, out=1), mlp(in_features=2, out=1)
    for window in (batches[0:4], batches[4:8], batches[8:10]):
        large_batch_step(ref, window, lr=0.1)
    trainer = create_trainer(ours, torch.optim.SGD(ours.parameters(), lr=0.1), F.mse_loss, accumulation_steps=4)
    trainer.run(batches, max_epochs=1)
    assert trainer.state.optimizer_steps == 3
    assert max_param_diff(ref, ours) <= 1e-5


def test_uneven_last_batch_equals_full_batch_mean():
    batches = regression_batches(n_samples=70, batch_size=16)  # 16,16,16,16,6
    assert [len(b[1]) for b in batches] == [16, 16, 16, 16, 6]
    ref, ours = mlp(in_features=2, out=1), mlp(in_features=2, out=1)
    large_batch_step(ref, batches, lr=0.5)
    trainer = create_trainer(ours, torch.optim.SGD(ours.parameters(), lr=0.5), F.mse_loss, accumulation_steps=8)
    trainer.run(batches, max_epochs=1)
    assert trainer.state.optimizer_steps == 1
    assert max_param_diff(ref, ours) <= 1e-5


def test_token_weighted_accumulation_with_tensor_counts():
    """batch_size_fn may return a tensor (tokens): still the mean over all tokens."""
    gen = torch.Generator().manual_seed(3)
    sizes = [3, 7, 5]
    batches = [(torch.randn(n, 2, generator=gen), torch.randn(n, 1, generator=gen)) for n in sizes]
    ref, ours = mlp(in_features=2, out=1), mlp(in_features=2, out=1)
    large_batch_step(ref, batches, lr=0.2)
    trainer = create_trainer(
        ours,
        torch.optim.SGD(ours.parameters(), lr=0.2),
        F.mse_loss,
        accumulation_steps=3,
        batch_size_fn=lambda x, y: torch.tensor(y.shape[0]),
    )
    trainer.run(batches, max_epochs=1)
    assert max_param_diff(ref, ours) <= 1e-5


def test_windows_never_span_epochs():
    batches = regression_batches(n_samples=20, batch_size=4)  # 5 batches
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, accumulation_steps=2)
    trainer.run(batches, max_epochs=2)
    assert trainer.state.optimizer_steps == 6


def test_loader_without_length_flushes_the_tail_before_epoch_end_handlers():
    batches = regression_batches(n_samples=20, batch_size=4)  # 5 batches, windows 2, 2, 1

    class NoLen:
        def __iter__(self):
            return iter(batches)

    ref, ours = mlp(in_features=2, out=1), mlp(in_features=2, out=1)
    for window in (batches[0:2], batches[2:4], batches[4:5]):
        large_batch_step(ref, window, lr=0.1)
    trainer = create_trainer(ours, torch.optim.SGD(ours.parameters(), lr=0.1), F.mse_loss, accumulation_steps=2)
    seen_at_epoch_end = []
    trainer.add_event_handler(
        __import__("ignite").engine.Events.EPOCH_COMPLETED,
        lambda e: seen_at_epoch_end.append((e.state.optimizer_steps, e.state.window_position)),
    )
    trainer.run(NoLen(), max_epochs=1)
    assert seen_at_epoch_end == [(3, 0)]
    assert max_param_diff(ref, ours) <= 1e-5


def test_set_to_none_and_no_grad_left_after_step():
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, accumulation_steps=2)
    trainer.run(regression_batches(16, 4), max_epochs=1)
    assert all(p.grad is None for p in model.parameters())


def test_step_output_holds_tensors_not_python_numbers():
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, max_grad_norm=1.0)
    outputs = []
    trainer.add_event_handler(__import__("ignite").engine.Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    trainer.run(regression_batches(8, 4), max_epochs=1)
    assert all(isinstance(o.loss, torch.Tensor) and not o.loss.requires_grad for o in outputs)
    assert all(isinstance(o.grad_norm, torch.Tensor) for o in outputs)
    assert [o.stepped for o in outputs] == [True, True]
    assert copy.copy(outputs[0].num_samples) == 4


class _RecordsGradientSync(torch.nn.Sequential):
    """Stands for an FSDP2 (fully_shard) module: records each set_requires_gradient_sync call."""

    def __init__(self, *modules):
        super().__init__(*modules)
        self.sync_calls = []

    def set_requires_gradient_sync(self, requires_gradient_sync, *, recurse=True):
        self.sync_calls.append(requires_gradient_sync)


def test_fsdp2_style_modules_sync_gradients_only_on_the_closing_micro_batch():
    torch.manual_seed(0)
    model = _RecordsGradientSync(torch.nn.Linear(2, 1))
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, accumulation_steps=4)
    trainer.run(regression_batches(24, 4), max_epochs=1)  # 6 micro-batches: windows of 4 and 2
    assert model.sync_calls == [False, False, False, True, False, True]
