"""A small training run used by the resume tests, in a subprocess.

It has every source of randomness that exact resume must reproduce: shuffled
data order, random augmentation (in DataLoader workers when --workers > 0),
dropout, an LR scheduler and accumulation. ``--crash-at-iteration`` kills the
process with ``os._exit`` (inside an accumulation window when the iteration is
not a window's last); running again with ``--resume`` continues from the
newest valid checkpoint. ``--preemption`` attaches ``Preemption``;
``--signal-at-iteration`` then sends the process a real SIGTERM after that
iteration, and ``--signal-during-save`` sends it from inside the N-th checkpoint
commit. ``--async-save`` writes the checkpoints on the background writer
(``CheckpointRotation(async_save=True)``), ``--sync-save`` writes them
synchronously; with neither, the run uses ``CheckpointRotation``'s default. A preempted run exits with ``PREEMPTED_EXIT_STATUS``. The result JSON holds the per-step losses and a hash
of the final parameters and optimizer state. ``--matrix`` runs a whole list of
crash-then-resume cases in forked children of one process (see ``run_matrix``).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

import torch
import torch.nn.functional as F
from ignite.engine import Events

from engine_kit import StepEvents, create_trainer
from engine_kit.data_order import ResumableLoader
from engine_kit.stateful import register_stateful
from engine_kit.checkpoint import CheckpointDirectory
from handlers.checkpoint import CheckpointRotation
from handlers.preemption import PREEMPTED_EXIT_STATUS, Preemption


class Augmented(torch.utils.data.Dataset):
    """Fixed data plus noise and a random flip drawn per sample."""

    def __init__(self, n: int = 48) -> None:
        gen = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 6, generator=gen)
        self.y = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i] + 0.1 * torch.randn(6)
        if torch.rand(()) < 0.5:
            x = x.flip(0)
        return x, self.y[i]


class LossRecord:
    """Per-step losses, saved in checkpoints so a resumed run's record is whole."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def state_dict(self) -> dict:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = list(state["losses"])


def tensor_digest(tensors) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def signal_inside_commit(nth: int) -> None:
    """Send this process SIGTERM in the middle of the ``nth`` checkpoint commit (before the file is written)."""
    original, calls = CheckpointDirectory.commit, []

    def commit(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    CheckpointDirectory.commit = commit


CRASH_STATUS = 17
"""Exit status of a run stopped by an injected crash (``os._exit``)."""

COMPARED = ("losses", "params", "optimizer", "scheduler", "lr", "optimizer_steps")
"""The keys of ``train``'s result on which a resumed run must equal an uninterrupted one."""


def crash_hooks(crash_at_iteration: int | None = None, crash_after_epoch: int | None = None) -> list:
    """Trainer hooks that kill the process with ``os._exit(CRASH_STATUS)`` after that iteration / epoch end."""
    hooks = []
    if crash_at_iteration is not None:
        hooks.append(lambda t: t.add_event_handler(Events.ITERATION_COMPLETED(once=crash_at_iteration),
                                                   lambda: os._exit(CRASH_STATUS)))
    if crash_after_epoch is not None:
        hooks.append(lambda t: t.add_event_handler(Events.EPOCH_COMPLETED(once=crash_after_epoch),
                                                   lambda: os._exit(CRASH_STATUS)))
    return hooks


def _forked_run(case: dict, phase: str) -> int:
    """Fork a child that runs one phase of a matrix case; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    exit_child(lambda: _run_phase(case, phase))


def _run_phase(case: dict, phase: str) -> int:
    """Run one phase of a matrix case here; 0 once its result is written, 1 for a crash phase that never crashed."""
    hooks = crash_hooks(**case["crash"]) if phase == "crash" else []
    result = train(case["dir"], resume="auto" if phase == "resume" else None, hooks=hooks, **case["config"])
    if phase == "crash":  # a crash phase that gets here never crashed
        return 1
    with open(case["out"], "w") as f:
        json.dump(result, f)
    return 0


def exit_child(body: Callable[[], int]) -> NoReturn:
    """End a forked child with ``body()``'s status, or 1 after printing its traceback.

    Both streams are flushed first: ``os._exit`` skips the interpreter's own clean-up.
    """
    status = 1
    try:
        status = body()
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def run_matrix(spec_path: str, parallel: int = 2) -> int:
    """Run many cases in forked children, ``parallel`` at a time, importing torch once.

    ``spec_path`` is a JSON list of cases ``{"name", "dir", "out", "config", "crash"}``:
    ``config`` holds keyword arguments of :func:`train`; a case with a ``crash``
    (keyword arguments of :func:`crash_hooks`) is run until the crash kills its
    process (a real process exit, not an exception), then resumed with
    ``resume="auto"`` in a new process; a case without one runs uninterrupted.
    Each finished case writes its result JSON to ``out``. Prints one line per
    unexpected exit status and returns 1 if there was any.
    """
    with open(spec_path) as f:
        cases = json.load(f)
    queue = collections.deque((i, "crash" if case.get("crash") else "run") for i, case in enumerate(cases))
    running: dict[int, tuple[int, str]] = {}
    failed = 0
    while queue or running:
        while queue and len(running) < parallel:
            i, phase = queue.popleft()
            running[_forked_run(cases[i], phase)] = (i, phase)
        pid, status = os.wait()
        i, phase = running.pop(pid)
        code, expected = os.waitstatus_to_exitcode(status), CRASH_STATUS if phase == "crash" else 0
        if code != expected:
            failed += 1
            print(f"{cases[i]['name']}: the {phase} run exited {code}, not {expected}", flush=True)
        elif phase == "crash":
            queue.append((i, "resume"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True, help="the run's checkpoint directory (with --matrix: the cases' JSON file)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--matrix", action="store_true", help="run the cases listed in the --dir JSON file (see run_matrix)")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--every-steps", type=int, default=2)
    parser.add_argument("--crash-at-iteration", type=int, default=None)
    parser.add_argument("--crash-after-epoch", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--preemption", action="store_true")
    parser.add_argument("--signal-at-iteration", type=int, default=None)
    parser.add_argument("--signal-during-save", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--async-save", dest="async_save", action="store_const", const=True, default=None,
                      help="write checkpoints on the background writer")
    mode.add_argument("--sync-save", dest="async_save", action="store_const", const=False, help="write them synchronously")
    args = parser.parse_args(argv)
    if args.matrix:
        return run_matrix(args.dir, args.parallel)
    if args.out is None:
        parser.error("--out is required (except with --matrix)")

    hooks = []
    if args.signal_at_iteration is not None:
        hooks.append(lambda t: t.add_event_handler(Events.ITERATION_COMPLETED(once=args.signal_at_iteration),
                                                   lambda: os.kill(os.getpid(), signal.SIGTERM)))
    if args.signal_during_save is not None:
        signal_inside_commit(args.signal_during_save)
    hooks += crash_hooks(args.crash_at_iteration, args.crash_after_epoch)
    result = train(
        args.dir, epochs=args.epochs, accumulation=args.accumulation, workers=args.workers,
        every_steps=args.every_steps, resume="auto" if args.resume else None, device=args.device,
        precision=args.precision, preemption=args.preemption, hooks=hooks, async_save=args.async_save,
    )
    if result is None:
        return PREEMPTED_EXIT_STATUS
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


def train(
    run_dir, *, epochs: int = 3, accumulation: int = 1, workers: int = 0, every_steps: int = 2, keep_last: int = 2,
    resume=None, device: str = "cpu", precision: str = "fp32", preemption: bool = False, hooks=(), async_save: bool | None = None,
) -> dict | None:
    """One run (in this process); the result dict, or None when it was preempted.

    ``hooks`` are called with the trainer before it runs (crash or signal injectors).
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
    model = model.to(device)  # on CUDA, dropout draws from the CUDA generator
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    loader = ResumableLoader(Augmented(), batch_size=4, shuffle=True, seed=7, num_workers=workers)
    trainer = create_trainer(model, optimizer, F.cross_entropy, device=device, precision=precision,
                             accumulation_steps=accumulation, max_grad_norm=1.0)
    register_stateful(trainer, "scheduler", scheduler)
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda: scheduler.step())
    record = LossRecord()
    register_stateful(trainer, "losses", record)
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda e: record.losses.append(e.state.output.loss.item()))
    # async_save=None: the library's default save mode; the async tests name the mode they check.
    mode = {} if async_save is None else {"async_save": async_save}
    rotation = CheckpointRotation(run_dir, every_steps=every_steps, keep_last=keep_last, resume=resume, **mode)
    rotation.attach(trainer)
    if preemption:
        Preemption(rotation).attach(trainer)
    for hook in hooks:
        hook(trainer)
    try:
        trainer.run(loader, max_epochs=epochs)
    finally:
        rotation.close()  # an in-process "crash" (an exception) must not keep the directory locked
    if getattr(trainer.state, "preempted", None):
        return None
    return {
        "losses": record.losses,
        "params": tensor_digest(model.parameters()),
        "optimizer": tensor_digest(
            t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)
        ),
        "scheduler": scheduler.state_dict()["last_epoch"],
        "lr": optimizer.param_groups[0]["lr"],
        "optimizer_steps": trainer.state.optimizer_steps,
        "skipped_steps": trainer.state.skipped_steps,
        "scaler": trainer.state.scaler.state_dict(),
        "resumed_from": trainer.state.resumed_from,
    }


if __name__ == "__main__":
    sys.exit(main())
