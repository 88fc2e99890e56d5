"""Your own events: define an ``EventEnum``, register it on the trainer, fire and consume it.

``LabEvents.LR_PHASE_CHANGED`` is fired by a handler on
``StepEvents.OPTIMIZER_STEP_COMPLETED`` that watches the learning rate turn
from rising (warmup) to falling (cosine decay); ``LabEvents.NEW_BEST`` by a
validation handler when the accuracy strictly beats every earlier one. A third
handler, which knows nothing about either detector, consumes both events: it
counts and prints them. Events carry no payload in ignite, so the firing
handler leaves what the consumers need on ``engine.state`` first.

A small MLP on scikit-learn's bundled digits (offline), a few seconds on a CPU.

Run:
    python examples/custom_events.py            # 10 epochs
    python examples/custom_events.py --quick --out-json events.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from ignite.engine import Engine, EventEnum
from ignite.metrics import Accuracy
from sklearn.datasets import load_digits

from engine_kit import StepEvents, create_evaluator, create_trainer
from engine_kit.doctor import decay_groups
from handlers.schedulers import attach_scheduler, onecycle_total_steps, warmup_cosine


class LabEvents(EventEnum):
    """Events this example adds to the trainer."""

    NEW_BEST = "new_best"
    LR_PHASE_CHANGED = "lr_phase_changed"


class LrPhaseWatcher:
    """Fires ``LR_PHASE_CHANGED`` once, when the learning rate first falls after rising.

    It compares the learning rate after each optimizer step with the one after
    the previous step, so it works for any warmup-then-decay schedule (warmup
    cosine, OneCycleLR) without knowing its milestones. A relative tolerance
    keeps the float noise at the peak from counting as a fall.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, tolerance: float = 1e-9) -> None:
        self.optimizer = optimizer
        self.tolerance = tolerance
        self.previous_lr: float | None = None
        self.phase = "warmup"

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        falling = self.previous_lr is not None and lr < self.previous_lr * (1 - self.tolerance)
        self.previous_lr = lr
        if falling and self.phase == "warmup":
            self.phase = "decay"
            engine.state.lr_phase = self.phase
            engine.fire_event(LabEvents.LR_PHASE_CHANGED)


class BestAccuracy:
    """Validates every ``every`` optimizer steps; fires ``NEW_BEST`` on a strict improvement."""

    def __init__(self, evaluator: Engine, loader: torch.utils.data.DataLoader, *, every: int) -> None:
        self.evaluator = evaluator
        self.loader = loader
        self.every = every
        self.history: list[float] = []

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED(every=self.every), self)

    def __call__(self, engine: Engine) -> None:
        accuracy = float(self.evaluator.run(self.loader).metrics["accuracy"])
        improved = not self.history or accuracy > max(self.history)
        self.history.append(accuracy)
        if improved:
            engine.state.best_accuracy = accuracy
            engine.fire_event(LabEvents.NEW_BEST)


class EventTally:
    """Consumes every ``LabEvents`` member: counts and prints each firing."""

    def __init__(self) -> None:
        self.counts = {event.value: 0 for event in LabEvents}
        self.steps: dict[str, list[int]] = {event.value: [] for event in LabEvents}

    def attach(self, trainer: Engine) -> None:
        for event in LabEvents:
            trainer.add_event_handler(event, self, event)

    def __call__(self, engine: Engine, event: LabEvents) -> None:
        self.counts[event.value] += 1
        self.steps[event.value].append(engine.state.optimizer_steps)
        if event is LabEvents.NEW_BEST:
            detail = f"validation accuracy {engine.state.best_accuracy:.3f}"
        else:
            detail = f"learning rate entered its {engine.state.lr_phase} phase"
        print(f"step {engine.state.optimizer_steps:3d}  {event.name}: {detail}")


def digits_loaders(batch_size: int, seed: int) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """An 80/20 split of the digits, drawn from ``seed``; validation is not shuffled."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    train = torch.utils.data.TensorDataset(x[order[:cut]], y[order[:cut]])
    val = torch.utils.data.TensorDataset(x[order[cut:]], y[order[cut:]])
    train_loader = torch.utils.data.DataLoader(
        train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    return train_loader, torch.utils.data.DataLoader(val, batch_size=512)


def run(*, epochs: int, seed: int) -> dict:
    """Train, firing and counting the custom events; return the counts and the history."""
    torch.manual_seed(seed)
    train_loader, val_loader = digits_loaders(batch_size=32, seed=seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.AdamW(decay_groups(model, weight_decay=0.01), lr=1e-2)
    accumulation_steps = 2
    trainer = create_trainer(model, optimizer, F.cross_entropy, accumulation_steps=accumulation_steps)
    evaluator = create_evaluator(model, metrics={"accuracy": Accuracy()})

    # Registering makes the names known to the engine: handlers can attach to
    # them and fire_event accepts them. (event_to_attr=... would add every=/once= filters.)
    trainer.register_events(*LabEvents)

    total_steps = onecycle_total_steps(train_loader, epochs, accumulation_steps)
    warmup_steps = max(1, total_steps // 5)
    attach_scheduler(trainer, warmup_cosine(optimizer, warmup_steps=warmup_steps, total_steps=total_steps))
    LrPhaseWatcher(optimizer).attach(trainer)
    best = BestAccuracy(evaluator, val_loader, every=8)
    best.attach(trainer)
    tally = EventTally()
    tally.attach(trainer)

    trainer.run(train_loader, max_epochs=epochs)
    return {
        **tally.counts,
        "optimizer_steps": trainer.state.optimizer_steps,
        "warmup_steps": warmup_steps,
        "total_steps": total_steps,
        "accuracy_history": best.history,
        "event_steps": tally.steps,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs instead of 10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", type=Path, default=None, help="write event counts and accuracy history here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(epochs=3 if args.quick else 10, seed=args.seed)
    print(f"{result['optimizer_steps']} optimizer steps: NEW_BEST fired {result['new_best']}x, "
          f"LR_PHASE_CHANGED {result['lr_phase_changed']}x; best accuracy {max(result['accuracy_history']):.3f}")
    if args.out_json is not None:
        args.out_json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
