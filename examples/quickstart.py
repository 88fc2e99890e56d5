"""The README quick start: an MLP on scikit-learn's bundled digits (offline).

Run: python examples/quickstart.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ignite.engine import Events
from ignite.metrics import Accuracy
from sklearn.datasets import load_digits

from engine_kit import StepEvents, create_evaluator, create_trainer
from engine_kit.doctor import decay_groups


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train = torch.utils.data.TensorDataset(x[:1400], y[:1400])
    val = torch.utils.data.TensorDataset(x[1400:], y[1400:])
    train_loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    val_loader = torch.utils.data.DataLoader(val, batch_size=256)

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    # Weight decay on weight matrices only: decaying biases and norm scales only hurts.
    optimizer = torch.optim.AdamW(decay_groups(model, weight_decay=0.01), lr=3e-3)
    trainer = create_trainer(model, optimizer, F.cross_entropy, accumulation_steps=2, max_grad_norm=1.0)
    evaluator = create_evaluator(model, metrics={"accuracy": Accuracy()})

    @trainer.on(StepEvents.OPTIMIZER_STEP_COMPLETED(every=20))
    def log_step(engine):
        out = engine.state.output  # tensors: read them on your own cadence
        print(f"step {engine.state.optimizer_steps}: loss {out.loss.item():.3f} grad-norm {out.grad_norm.item():.2f}")

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine):
        accuracy = evaluator.run(val_loader).metrics["accuracy"]
        print(f"epoch {engine.state.epoch}: validation accuracy {accuracy:.3f}")

    trainer.run(train_loader, max_epochs=3)


if __name__ == "__main__":
    main()
