"""Mistakes seen on the first batches: loss inputs, batch device, gradients, waiting for data."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from engine_kit.doctor import DoctorSettings
from handlers import Doctor
from tests.doctor.plant import learnable_batches, train
from tests.helpers import mlp


def _binary_batches(n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, (x[:, :1] > 0).float()) for x, _ in learnable_batches(n)]


def test_softmax_output_into_cross_entropy():
    doctor = train(torch.nn.Sequential(mlp(), torch.nn.Softmax(dim=1)))
    assert doctor.codes == ["probabilities-into-logits-loss"]
    assert "cross_entropy expects logits but got probabilities on the first 3 batches" in doctor.findings[0].evidence


def test_log_softmax_output_into_cross_entropy():
    doctor = train(torch.nn.Sequential(mlp(), torch.nn.LogSoftmax(dim=1)))
    assert doctor.codes == ["probabilities-into-logits-loss"]
    assert "got log-probabilities" in doctor.findings[0].evidence


def test_sigmoid_output_into_bce_with_logits_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Sigmoid())
    doctor = train(model, loss_fn=torch.nn.BCEWithLogitsLoss(), data=_binary_batches())
    assert doctor.codes == ["probabilities-into-logits-loss"]
    assert doctor.findings[0].evidence.startswith("binary_cross_entropy_with_logits expects logits")


def test_logits_into_nll_loss():
    doctor = train(loss_fn=lambda y_pred, y: F.nll_loss(y_pred, y))
    assert doctor.codes == ["logits-into-probabilities-loss"]
    assert "nll_loss expects log-probabilities but got unnormalized logits" in doctor.findings[0].evidence


def test_logits_into_binary_cross_entropy_is_explained_before_torch_fails():
    torch.manual_seed(0)
    doctor = Doctor()
    with pytest.raises(RuntimeError, match="between 0 and 1"):
        train(torch.nn.Linear(4, 1), loss_fn=F.binary_cross_entropy, data=_binary_batches(), doctor=doctor)
    assert doctor.codes == ["logits-into-probabilities-loss"]


def test_the_loss_function_is_handed_back_after_the_first_batches():
    from engine_kit import create_trainer
    model = mlp()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), F.cross_entropy)
    Doctor().attach(trainer)
    trainer.run(learnable_batches(4), max_epochs=1)
    assert trainer.step.loss_fn is F.cross_entropy


def test_batches_on_another_device():
    # A "meta" tensor stands for a batch left on another accelerator; prepare_batch
    # makes a real CPU batch of it so that the step itself can run.
    data = [(torch.empty(16, 4, device="meta"), y) for _, y in learnable_batches(4)]
    doctor = train(data=data, prepare_batch=lambda batch, device, non_blocking: (torch.zeros(16, 4), batch[1]))
    assert doctor.codes == ["batch-device"]
    assert "batch 1 holds tensors on meta while the trainer trains on cpu" in doctor.findings[0].evidence


def test_parameters_that_never_get_a_gradient():
    class WithSpareHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp()
            self.spare = torch.nn.Linear(3, 3)  # built, never called

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    doctor = train(WithSpareHead())
    assert doctor.codes == ["no-gradient"]
    assert "2 of 6 trainable parameter tensors received no gradient in the first 3 optimizer steps: " \
           "spare.weight, spare.bias" in doctor.findings[0].evidence


class SlowDataset(Dataset):
    """Learnable samples that each take 15 ms to load: the loop waits for data."""

    def __init__(self, n: int) -> None:
        self.items = [(x[i], y[i]) for x, y in learnable_batches(n // 16 + 1) for i in range(16)][:n]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(0.015)
        return self.items[i]


def test_data_starvation():
    loader = DataLoader(SlowDataset(2 * 12), batch_size=2)
    doctor = train(data=loader, doctor=Doctor(settings=DoctorSettings(timing_iterations=8)))
    assert doctor.codes == ["data-starvation"]
    finding = doctor.findings[0]
    assert "over 8 iterations" in finding.evidence and "num_workers=0" in finding.fix
