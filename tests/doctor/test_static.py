"""Mistakes visible before the first step: each planted alone, each found alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.metrics import Accuracy
from torch.utils.data import DataLoader, TensorDataset

from engine_kit import create_evaluator
from handlers import CheckpointRotation, Doctor, Validation, attach_scheduler, warmup_cosine
from tests.doctor.plant import learnable_batches, train
from tests.helpers import mlp


def test_all_frozen_model_is_found_before_the_step_fails():
    model = mlp().requires_grad_(False)
    doctor = Doctor()
    with pytest.raises(ValueError, match="does not require grad"):
        train(model, doctor=doctor)
    assert doctor.codes == ["all-frozen"]
    assert "none of the model's 4 parameter tensors requires grad" in doctor.findings[0].evidence


def test_trainable_parameters_outside_the_optimizer():
    model = mlp()
    with pytest.warns(UserWarning, match="not in the optimizer"):
        doctor = train(model, optimizer=lambda m: torch.optim.SGD(m[0].parameters(), lr=0.5))
    assert doctor.codes == ["params-not-optimized"]
    assert "2 of 4 trainable parameter tensors" in doctor.findings[0].evidence


def test_batchnorm_with_accumulation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    doctor = train(model, accumulation_steps=2)
    assert doctor.codes == ["batchnorm-accumulation"]
    assert "accumulation_steps=2" in doctor.findings[0].evidence
    assert train(model, accumulation_steps=1).codes == []


def test_weight_decay_on_biases_and_norms():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    doctor = train(model, optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2))
    assert doctor.codes == ["weight-decay-on-norms"]
    assert "weight_decay=0.01 to 4 bias and normalization tensors" in doctor.findings[0].evidence
    # The fix the finding names is clean.
    from engine_kit.doctor import decay_groups
    assert train(model, optimizer=lambda m: torch.optim.AdamW(decay_groups(m, 0.01), lr=1e-2)).codes == []


def test_onecycle_shorter_than_the_run_is_found_before_it_raises():
    doctor = Doctor()

    def schedule(trainer):
        optimizer = trainer.step.optimizer
        attach_scheduler(trainer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=5))

    with pytest.raises(Exception, match="Tried to step"):
        train(doctor=doctor, before=schedule)
    assert doctor.codes == ["schedule-length"]
    assert "total_steps=5 but the run makes 8 optimizer steps" in doctor.findings[0].evidence


@pytest.mark.parametrize("build, words", [
    (lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=40), "at 20% of the cycle"),
    (lambda opt: warmup_cosine(opt, warmup_steps=10, total_steps=20), "the warmup (LinearLR, total_iters=10)"),
    (lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4), "climbs back up for the last 4"),
])
def test_schedule_length_against_the_run(build, words):
    doctor = train(before=lambda trainer: attach_scheduler(trainer, build(trainer.step.optimizer)))
    assert doctor.codes == ["schedule-length"]
    assert words in doctor.findings[0].evidence


def test_matching_schedule_is_clean():
    doctor = train(before=lambda trainer: attach_scheduler(
        trainer, warmup_cosine(trainer.step.optimizer, warmup_steps=2, total_steps=8)))
    assert doctor.codes == []


def _tensor_data(n: int = 64, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    return TensorDataset(x, x[:, :3].argmax(1))


def test_shuffled_validation_loader_of_your_own():
    train_set, val_set = _tensor_data(64), _tensor_data(32, seed=1)
    doctor = Doctor(val_loader=DataLoader(val_set, batch_size=8, shuffle=True))
    train(doctor=doctor, data=DataLoader(train_set, batch_size=8))
    assert doctor.codes == ["validation-shuffled"]


def test_validation_sharing_the_training_dataset():
    data = _tensor_data(64)
    model = mlp()
    evaluator = create_evaluator(model, metrics={"accuracy": Accuracy()})
    with pytest.warns(UserWarning, match="overlap"):
        validation = Validation(evaluator, DataLoader(data, batch_size=16), train_data=data)
    doctor = train(model, data=DataLoader(data, batch_size=8), before=validation.attach)
    assert doctor.codes == ["validation-overlap"]
    assert "64 validation samples are also training samples" in doctor.findings[0].evidence


def test_validation_items_identical_to_training_items():
    train_set = _tensor_data(64)
    copies = TensorDataset(train_set.tensors[0][:8].clone(), train_set.tensors[1][:8].clone())
    doctor = Doctor(val_loader=DataLoader(copies, batch_size=8))
    train(doctor=doctor, data=DataLoader(train_set, batch_size=8))
    assert doctor.codes == ["validation-overlap"]
    assert "8 of 8 sampled validation items are byte-identical" in doctor.findings[0].evidence


def test_identical_item_check_leaves_the_random_stream_alone():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int):
            return torch.rand(2), 0

    from engine_kit.doctor import DoctorSettings, identical_items
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    identical_items(Noisy(), Noisy(), DoctorSettings())
    assert torch.equal(torch.rand(1), expected)


def test_no_best_checkpoint_while_validating(tmp_path):
    model = mlp()
    evaluator = create_evaluator(model, metrics={"accuracy": Accuracy()})

    def attach(trainer):
        Validation(evaluator, learnable_batches(2, seed=5)).attach(trainer)
        CheckpointRotation(tmp_path / "ckpt", keep_best=0).attach(trainer)

    doctor = train(model, before=attach)
    assert doctor.codes == ["no-best-checkpoint"]
