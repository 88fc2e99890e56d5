"""The loop doctor at work: a small run with three planted mistakes, and what the doctor says about each.

The mistakes (each one common, none of them an error PyTorch would raise):

1. the model ends in ``Softmax`` and its output goes into ``cross_entropy``,
   which applies log-softmax itself;
2. ``AdamW(model.parameters())`` decays the biases too (its default
   ``weight_decay=0.01`` applies to every parameter);
3. the validation split holds copies of training samples (a dataset with
   duplicates, split after the fact).

    python examples/doctor_demo.py                      # findings on the console, then `engine-kit doctor`
    python examples/doctor_demo.py --run-dir runs/demo  # keep the run directory

Offline and CPU-only; a few seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from ignite.metrics import Accuracy, Loss
from torch.utils.data import DataLoader, TensorDataset

from engine_kit import create_evaluator, create_trainer
from engine_kit.doctor import diagnose_run, report_lines
from handlers import attach_standard


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of three Gaussian blobs in 8 dimensions, and their blob."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    centers = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * 2
    return centers[labels] + torch.randn(n, 8, generator=gen), labels


def run(run_dir: Path, epochs: int) -> list[str]:
    """Train with the three mistakes under attach_standard's doctor; return the codes it found."""
    torch.manual_seed(0)
    x, y = blobs(512, seed=1)
    train_set = TensorDataset(x, y)
    fresh_x, fresh_y = blobs(64, seed=2)
    # Mistake 3: half the validation set are copies of training samples.
    val_set = TensorDataset(torch.cat([fresh_x, x[:64].clone()]), torch.cat([fresh_y, y[:64].clone()]))

    # Mistake 1: probabilities out of the model, into a loss that expects logits.
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3), torch.nn.Softmax(dim=1))
    # Mistake 2: weight decay on every parameter, biases included.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = create_trainer(model, optimizer, F.cross_entropy)
    evaluator = create_evaluator(model, metrics={"accuracy": Accuracy(), "loss": Loss(F.cross_entropy)})
    stack = attach_standard(trainer, evaluator, DataLoader(val_set, batch_size=64), run_dir=run_dir,
                            checkpoint_every_steps=None, log_every=16)
    print(f"training {epochs} epochs with three planted mistakes; the doctor reports as it finds them:")
    trainer.run(DataLoader(train_set, batch_size=32, shuffle=True), max_epochs=epochs)
    print(f"\nvalidation accuracy {trainer.state.val_metrics['accuracy']:.3f}, overstated by the duplicated "
          f"samples; the doctor found {len(stack.doctor.findings)} mistakes.")
    print(f"\n$ engine-kit doctor {run_dir}   (from the run's logs alone)")
    print("\n".join(report_lines(diagnose_run(run_dir))))
    return stack.doctor.codes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="accepted for the example runner; the demo is quick")
    parser.add_argument("--out-json", type=Path, default=None, help="write the codes found here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="doctor-demo-") as scratch:
        codes = run(args.run_dir or Path(scratch), args.epochs)
    result = {"codes": codes}
    if args.out_json is not None:
        args.out_json.write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
