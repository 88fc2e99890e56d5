"""A small 2-process training run for the distributed tests, launched with ``torchrun``.

It follows the README recipe: ``idist.Parallel`` over the ``torchrun``
environment, ``idist.auto_model`` (DDP), ``create_trainer(accumulation_steps=2,
max_grad_norm=1.0)``, ``ResumableLoader(shuffle=True)``, ``Validation`` and
``CheckpointRotation(every_steps=8, keep_last=2, resume="auto")``, with
per-rank random streams (``manual_seed(seed + rank)``, dropout, random
augmentation). Kill switches SIGKILL one rank at an iteration or rank 0 in the
middle of a save. Each rank writes a JSON result (per-step losses, a digest of
the final parameters, the step it resumed from).

    torchrun --standalone --nproc-per-node 2 tests/distributed/train_script.py --dir D --out 'out-{rank}.json'
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import threading
from pathlib import Path

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from ignite.engine import Events
from ignite.metrics import Loss

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from engine_kit import StepEvents, create_evaluator, create_trainer  # noqa: E402
from engine_kit.data_order import ResumableLoader  # noqa: E402
from engine_kit.stateful import register_stateful  # noqa: E402
from handlers.checkpoint import CheckpointRotation  # noqa: E402
from handlers.validation import Validation  # noqa: E402
from tests.resume.train_script import LossRecord, tensor_digest  # noqa: E402

SAMPLES, FEATURES, CLASSES = 96, 6, 3


class Augmented(torch.utils.data.Dataset):
    """Fixed data plus noise and a random flip drawn per sample."""

    def __init__(self, n: int, seed: int, augment: bool) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, FEATURES, generator=gen)
        self.y = torch.randint(0, CLASSES, (n,), generator=gen)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        if self.augment:
            x = x + 0.1 * torch.randn(FEATURES)
            if torch.rand(()) < 0.5:
                x = x.flip(0)
        return x, self.y[i]


class KillDuringSave:
    """Captured at every save (on rank 0); at save number ``at_save`` it SIGKILLs rank 0 after ``delay_s``.

    The delay lands the kill somewhere in the write: capture, file write, fsync, registry.
    """

    def __init__(self, at_save: int | None, delay_s: float) -> None:
        self.at_save, self.delay_s, self.saves = at_save, delay_s, 0

    def state_dict(self) -> dict:
        self.saves += 1
        if self.saves == self.at_save:
            threading.Timer(self.delay_s, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def training(local_rank: int, args: argparse.Namespace) -> None:
    rank = idist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed + rank)  # per-rank random streams: dropout and augmentation differ by rank
    model = idist.auto_model(
        torch.nn.Sequential(
            torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, CLASSES)
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train = ResumableLoader(Augmented(SAMPLES, 123, augment=True), batch_size=4, shuffle=True, seed=7)
    val = torch.utils.data.DataLoader(Augmented(32, 321, augment=False), batch_size=8)
    trainer = create_trainer(model, optimizer, F.cross_entropy, accumulation_steps=2, max_grad_norm=1.0)
    evaluator = create_evaluator(model, metrics={"loss": Loss(F.cross_entropy)})
    record = LossRecord()
    register_stateful(trainer, "losses", record)
    # The loss averaged over the ranks: the same record on every rank, whichever rank's checkpoint it came from.
    trainer.add_event_handler(
        StepEvents.OPTIMIZER_STEP_COMPLETED, lambda e: record.losses.append(idist.all_reduce(e.state.output.loss.item()) / idist.get_world_size())
    )
    register_stateful(trainer, "kill_during_save", KillDuringSave(args.kill_rank0_at_save if rank == 0 else None, args.kill_delay))
    Validation(evaluator, val, every_epochs=1).attach(trainer)
    directory = args.dir.format(rank=rank)
    CheckpointRotation(directory, every_steps=8, keep_last=2, resume="auto").attach(trainer)
    resumed_at: list[int] = []

    @trainer.on(Events.STARTED)
    def note_resume(engine) -> None:
        resumed_at.append(engine.state.optimizer_steps)
        print(f"rank {rank}: starting at optimizer step {engine.state.optimizer_steps}", flush=True)

    if args.kill_rank is not None and rank == args.kill_rank:
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED(once=args.kill_at_iteration), lambda: os.kill(os.getpid(), signal.SIGKILL)
        )
    trainer.run(train, max_epochs=args.epochs)
    result = {
        "rank": rank,
        "losses": record.losses,
        "params": tensor_digest(model.module.parameters() if hasattr(model, "module") else model.parameters()),
        "optimizer_steps": trainer.state.optimizer_steps,
        "resumed_from": trainer.state.resumed_from,
        "resumed_at_step": resumed_at[0],
        "next_random": torch.rand(1).item(),  # this rank's stream after the run
    }
    with open(args.out.format(rank=rank), "w") as f:
        json.dump(result, f)
    # Free the DDP model (and the gloo work it holds) while the process group still exists: left to the
    # interpreter's exit, after Parallel destroyed the group, gloo's threads sometimes abort the process.
    del trainer, evaluator, model, optimizer
    gc.collect()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True, help="checkpoint directory; '{rank}' in it gives one per rank")
    parser.add_argument("--out", required=True, help="result JSON per rank, with '{rank}' in the name")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-at-iteration", type=int, default=None)
    parser.add_argument("--kill-rank0-at-save", type=int, default=None)
    parser.add_argument("--kill-delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    with idist.Parallel(backend="gloo") as parallel:
        parallel.run(training, args)


if __name__ == "__main__":
    main()
