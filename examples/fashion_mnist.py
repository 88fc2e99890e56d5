"""The FashionMNIST lab: engine_kit's flagship run, composed from the public API only.

A small CNN (two conv-relu-pool blocks, a 128-unit head, 10 classes) trained
with AdamW + OneCycleLR, clipping at 10.0, physical batch 32 x accumulation 4,
AMP on GPU, atomic "last" and "best" checkpoints, a simulated crash and an
automatic resume. Offline it trains on scikit-learn's bundled digits and says so.

    python examples/fashion_mnist.py --run-dir runs/lab                  # full run
    python examples/fashion_mnist.py --run-dir runs/q --quick            # about a minute
    python examples/fashion_mnist.py --run-dir runs/c --crash-at-step 20 # dies at step 20...
    python examples/fashion_mnist.py --run-dir runs/c --crash-at-step 20 # ...and resumes
    python examples/fashion_mnist.py --run-dir runs/c --epochs 8         # extends the finished run

SIGTERM or SIGINT (Ctrl-C) finishes the accumulation window, saves a checkpoint
and exits with status 75; running the same command again resumes from it.
Changing --epochs on a resumed run rebuilds the OneCycle schedule for the new
length from the current step on (and says so); fewer epochs than the run has
already done is refused.

Artifacts in --run-dir: steps.jsonl (+ steps.csv), tb/ (TensorBoard),
checkpoints/, grad_norm_hist.png, curves.png, summary.md, summary.json, run.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Events
from ignite.metrics import Accuracy, Loss

from engine_kit import create_evaluator, create_trainer
from engine_kit.data_order import ResumableLoader
from engine_kit.doctor import decay_groups
from engine_kit.errors import CheckpointMismatchError, HandlerError, RunDirectoryError
from engine_kit.report import write_report
from engine_kit.run_directory import prepare_run_directory
from engine_kit.stateful import register_stateful
from handlers import (
    CheckpointRotation,
    Doctor,
    GradNormLogger,
    NanGuard,
    StepLog,
    TensorBoardLogger,
    Validation,
    attach_scheduler,
    optimizer_steps_per_epoch,
    to_csv,
)
from handlers.preemption import PREEMPTED_EXIT_STATUS, Preemption

PHYSICAL_BATCH = 32
ACCUMULATION = 4
# A safety net against spikes, not a limit on every update: at 1.0 the lab clipped 87% of its
# steady-state steps (pre-clip norms 1.3-8.6 after the warm-up); at 10.0 under 5% clip.
MAX_GRAD_NORM = 10.0
LEARNING_RATE = 1e-3
MAX_LR = 3e-3


# -- data -------------------------------------------------------------------
def _fashion_mnist(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import socket

    import torchvision

    try:
        ds = torchvision.datasets.FashionMNIST(str(data_dir), train=True, download=False)
    except RuntimeError:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(10)  # offline machines must fall back quickly, not hang
        try:
            ds = torchvision.datasets.FashionMNIST(str(data_dir), train=True, download=True)
        finally:
            socket.setdefaulttimeout(previous)
    x = ds.data.unsqueeze(1).float() / 255.0
    return (x - 0.2860) / 0.3530, ds.targets.clone()


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    # 8x8 scans upsampled to FashionMNIST's 28x28, so the same CNN serves both.
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return (x - x.mean()) / x.std(), torch.tensor(digits.target)


def load_data(name: str, data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images N x 1 x 28 x 28, labels, dataset name); ``auto`` falls back offline."""
    if name in ("auto", "fashion-mnist"):
        try:
            x, y = _fashion_mnist(data_dir)
            return x, y, "fashion-mnist"
        except Exception as err:  # noqa: BLE001 - any failure to obtain the files means "not available"
            if name == "fashion-mnist":
                raise SystemExit(f"FashionMNIST is not in {data_dir} and could not be downloaded: {err}") from err
            print(f"FashionMNIST not found in {data_dir} and not downloadable ({type(err).__name__}); "
                  "using scikit-learn's bundled digits (1,797 real handwritten digits, upsampled to 28x28).")
    x, y = _digits()
    return x, y, "digits"


class Images(torch.utils.data.Dataset):
    """Images with an optional random shift of up to 2 pixels (training augmentation)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: bool) -> None:
        self.x, self.y, self.augment = x, y, augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.x[i]
        if self.augment:
            # Drawn from torch's global RNG, which ResumableLoader seeds per sample,
            # so a resumed run sees the very same shifts.
            dx, dy = torch.randint(-2, 3, (2,)).tolist()
            image = torch.roll(image, shifts=(dy, dx), dims=(1, 2))
        return image, self.y[i]


# -- model ------------------------------------------------------------------
def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 7 * 7, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
    )


def params_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the state_dict's tensors in key order: equal means bitwise-equal models."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def make_one_cycle(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """The lab's schedule: warm up to MAX_LR over 30% of the steps, then cosine down."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=MAX_LR, total_steps=total_steps, pct_start=0.3)


def rebuild_one_cycle(scheduler: torch.optim.lr_scheduler.OneCycleLR, total_steps: int) -> None:
    """Re-plan a restored OneCycle schedule for ``total_steps``, continuing from its current step.

    The phases (warm-up, annealing) are recomputed for the new length with the
    same max_lr, pct_start and annealing; the learning rate of the next step is
    the new schedule's at the current position.
    """
    # The phases of the new length, from a schedule built the same way on a stand-in optimizer.
    stand_in = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=LEARNING_RATE)
    template = make_one_cycle(stand_in, total_steps)
    state = scheduler.state_dict()
    state["total_steps"], state["_schedule_phases"] = total_steps, template.state_dict()["_schedule_phases"]
    scheduler.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_lr outside step() warns; here it is the point
        lrs = scheduler.get_lr()  # also sets the cycled momentum for the next step
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    state = scheduler.state_dict()
    state["_last_lr"] = lrs
    scheduler.load_state_dict(state)


class RunFacts:
    """Facts that must survive a crash (saved in every checkpoint): resumes so far."""

    def __init__(self) -> None:
        self.resumes: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"resumes": list(self.resumes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resumes = list(state["resumes"])


# -- the run ----------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--epochs", type=int, default=None, help="default 5 (2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a short run: 2 epochs on a subset")
    parser.add_argument("--crash-at-step", type=int, default=None, help="os._exit(1) after this optimizer step, once")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="optimizer steps between 'last' checkpoints (default 100, fewer on small data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", choices=("auto", "fashion-mnist", "digits"), default="auto")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    run_dir: Path = args.run_dir
    try:
        for path in (run_dir, run_dir / "checkpoints", run_dir / "tb"):
            prepare_run_directory(path)
    except RunDirectoryError as err:
        raise SystemExit(f"lab: {err}") from None
    epochs = args.epochs or (2 if args.quick else 5)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.manual_seed(args.seed)

    x, y, dataset = load_data(args.dataset, args.data_dir)
    if args.quick:
        x, y = x[:1200], y[:1200]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    n_train = int(0.8 * len(y))
    train_idx, val_idx = order[:n_train], order[n_train:]
    train_set = Images(x[train_idx], y[train_idx], augment=True)
    val_set = Images(x[val_idx], y[val_idx], augment=False)
    # Data order is a function of (seed, epoch): what exact resume needs.
    train_loader = ResumableLoader(train_set, PHYSICAL_BATCH, shuffle=True, seed=args.seed)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=256, shuffle=False)

    model = make_model().to(device)
    # Weight decay on the weights only, none on biases (what the doctor checks).
    optimizer = torch.optim.AdamW(decay_groups(model, weight_decay=0.01), lr=LEARNING_RATE)
    trainer = create_trainer(model, optimizer, F.cross_entropy, device=device, precision=args.precision,
                             accumulation_steps=ACCUMULATION, max_grad_norm=MAX_GRAD_NORM)
    steps_per_epoch = optimizer_steps_per_epoch(len(train_loader), ACCUMULATION)
    scheduler = make_one_cycle(optimizer, steps_per_epoch * epochs)
    attach_scheduler(trainer, scheduler)
    evaluator = create_evaluator(model, metrics={"accuracy": Accuracy(), "loss": Loss(F.cross_entropy)},
                                 device=device, precision=args.precision)

    # Order matters: validation before the handlers that read its metrics; checkpoints last.
    Validation(evaluator, val_loader, every_epochs=1, train_data=train_set).attach(trainer)
    tensorboard = TensorBoardLogger(log_dir=run_dir / "tb", log_every=25)
    tensorboard.attach(trainer)
    GradNormLogger(flush_every=25, writer=tensorboard.writer).attach(trainer)
    StepLog(run_dir / "steps.jsonl", flush_every=25).attach(trainer)
    NanGuard(check_every=25).attach(trainer)
    Doctor(path=run_dir / "doctor.json", train_data=train_set).attach(trainer)
    facts = RunFacts()
    register_stateful(trainer, "run_facts", facts)
    # At least two "last" saves per epoch, even on the small offline dataset.
    every = args.checkpoint_every or min(100, max(1, steps_per_epoch // 2))
    rotation = CheckpointRotation(run_dir / "checkpoints", every_steps=every, keep_last=2, keep_best=1,
                                  metric="accuracy", mode="max", resume="auto")
    rotation.attach(trainer)
    Preemption(rotation).attach(trainer)  # SIGTERM/SIGINT: finish the window, save, stop

    crash_marker = run_dir / ".crashed"

    @trainer.on(Events.STARTED)
    def note_resume(engine) -> None:
        state = engine.state
        finished = state.epoch_length and state.iteration >= state.epoch_length * state.max_epochs
        if state.resumed_from and finished:
            print(f"run already complete at optimizer step {state.optimizer_steps}; regenerating the report")
        elif state.resumed_from:
            saved_epochs = getattr(state, "checkpoint_max_epochs", None)
            if scheduler.total_steps != steps_per_epoch * epochs:
                rebuild_one_cycle(scheduler, steps_per_epoch * epochs)
                print(f"run length changed from {saved_epochs} to {epochs} epochs: the OneCycle schedule is rebuilt "
                      f"for {steps_per_epoch * epochs} steps, continuing at step {state.optimizer_steps}")
            crashed_after = int(crash_marker.read_text()) if crash_marker.exists() else engine.state.optimizer_steps
            facts.resumes.append({"from": os.path.basename(engine.state.resumed_from),
                                  "step": engine.state.optimizer_steps, "crashed_after_step": crashed_after})
            print(f"resumed from {engine.state.resumed_from} at optimizer step {engine.state.optimizer_steps}")

    if args.crash_at_step is not None and not crash_marker.exists():
        @trainer.on(Events.ITERATION_COMPLETED)
        def crash(engine) -> None:
            # After the checkpoint handler of this iteration: a real crash, mid-training.
            if engine.state.window_position == 0 and engine.state.optimizer_steps == args.crash_at_step:
                # A real crash may also lose the checkpoint still being written in the background (the rerun then
                # resumes from the one before); waiting for it keeps the lab's resume point independent of disk speed.
                rotation.flush()
                crash_marker.write_text(str(args.crash_at_step))
                print(f"simulated crash after optimizer step {args.crash_at_step}", flush=True)
                os._exit(1)

    @trainer.on(Events.EPOCH_COMPLETED)
    def report_epoch(engine) -> None:
        metrics = engine.state.val_metrics
        print(f"epoch {engine.state.epoch}/{epochs}: step {engine.state.optimizer_steps}, "
              f"val accuracy {metrics['accuracy']:.4f}, val loss {metrics['loss']:.4f}", flush=True)

    print(f"lab: {dataset}, {len(train_set)} train / {len(val_set)} validation images, device {device}, "
          f"precision {trainer.state.precision}, {steps_per_epoch} optimizer steps per epoch, "
          f"checkpoint every {every} steps")
    started = time.time()
    try:
        trainer.run(train_loader, max_epochs=epochs)
    except HandlerError as err:
        if isinstance(err.__cause__, CheckpointMismatchError):
            raise SystemExit(f"lab: cannot continue the run in {run_dir}: {err.__cause__}") from None
        raise
    finally:
        tensorboard.close()
    if trainer.state.preempted:
        print(f"{trainer.state.stopped_by}; checkpoint {getattr(trainer.state, 'last_checkpoint', None)}. Run the same command "
              f"again to resume. Exit status {PREEMPTED_EXIT_STATUS}.", flush=True)
        sys.exit(PREEMPTED_EXIT_STATUS)

    best = rotation.best()
    run = {
        "dataset": dataset,
        "device": device,
        "precision": trainer.state.precision,
        "epochs": epochs,
        "seed": args.seed,
        "metric": "accuracy",
        "val_history": trainer.state.val_history,
        "best": best and {k: best[k] for k in ("name", "step", "metric")},
        "optimizer_steps": trainer.state.optimizer_steps,
        "skipped_steps": trainer.state.skipped_steps,
        "max_grad_norm": MAX_GRAD_NORM,
        "resumed_from": trainer.state.resumed_from and os.path.basename(trainer.state.resumed_from),
        "resumes": facts.resumes,
        "final_params_sha256": params_sha256(model),
        "wall_time_this_process_s": round(time.time() - started, 2),
        "stopped_by": getattr(trainer.state, "stopped_by", None),
    }
    (run_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    to_csv(run_dir / "steps.jsonl", run_dir / "steps.csv")
    summary = write_report(run_dir)
    final = summary["final_metric"]
    final_text = f"{final:.4f}" if final is not None else "not measured at the final step"
    print(f"done: best {summary['metric']} {summary['best_metric']:.4f}, final {final_text}, "
          f"{summary['clipped_fraction']:.0%} of steps clipped; see {run_dir}/summary.md")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
