"""One class per row of the checkpoint tables, all behind the same small interface.

A saver saves model + optimizer state (engine_kit: the whole training state)
when told to, and says whether a write it started is still running:

- ``save()`` returns when training may change the parameters again (a
  synchronous save: once the file is written; an asynchronous one: once its
  snapshot is taken);
- ``in_flight()`` is True while a background write has not finished;
- ``drain()`` waits until every write it started is finished;
- ``attach(trainer, every)`` makes it save every ``every`` optimizer steps of
  an engine_kit trainer (the training-loop table), draining at the run's end
  inside the timed run, so an unfinished write is never left out of a stall.

Rows that cannot run here (Lightning not installed, a mode this commit's
``CheckpointRotation`` lacks) say why from :func:`unavailable`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
from ignite.engine import Engine, Events

from engine_kit import create_trainer
from handlers import CheckpointRotation

from .workload import raw_state, tensors_of

TORCH_SAVE = "torch.save"
TORCH_SAVE_FSYNC = "torch.save + fsync"
PLAIN_COPY = "plain copy of the state"
DCP_ASYNC = "torch.distributed.checkpoint.async_save"
LIGHTNING_ASYNC = "Lightning AsyncCheckpointIO"
EK_SYNC = "engine_kit sync"
EK_COPY = "engine_kit async (copy)"
EK_FENCE = "engine_kit async (fence)"
ROWS = (TORCH_SAVE, TORCH_SAVE_FSYNC, PLAIN_COPY, DCP_ASYNC, LIGHTNING_ASYNC, EK_SYNC, EK_COPY, EK_FENCE)
# Rows whose save() only takes a snapshot and writes in the background.
ASYNC_ROWS = (DCP_ASYNC, LIGHTNING_ASYNC, EK_COPY, EK_FENCE)


class Saver:
    """The interface every row implements; the base class is a synchronous saver that writes nothing."""

    #: False for the plain copy, which writes no file (so nothing ever becomes durable).
    writes_file = True
    #: True when the step after a save waits for the writer (engine_kit's fence): that step blocks training.
    holds_next_step = False

    def save(self) -> None:
        """Save now; return when training may go on."""
        raise NotImplementedError

    def in_flight(self) -> bool:
        """Whether a write this saver started is still running."""
        return False

    def drain(self) -> None:
        """Wait until every write this saver started has finished."""

    def close(self) -> None:
        """Drain and release threads, locks and buffers."""
        self.drain()

    def extras(self) -> dict[str, Any]:
        """Row-specific counters worth keeping in the JSON (back-pressure waits, fence time...)."""
        return {}

    def attach(self, trainer: Engine, every: int) -> None:
        """Save every ``every`` iterations of ``trainer`` (one optimizer step each); drain at its end."""
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=every), lambda _: self.save())
        trainer.add_event_handler(Events.COMPLETED, lambda _: self.drain())


class TorchSave(Saver):
    """``torch.save`` of model + optimizer state over one file, as a hand-written loop does; ``fsync`` optional."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path, *, fsync: bool) -> None:
        self.model, self.optimizer, self.fsync = model, optimizer, fsync
        self.path = directory / ("torch-save-fsync.pt" if fsync else "torch-save.pt")

    def save(self) -> None:
        with open(self.path, "wb") as fileobj:
            torch.save(raw_state(self.model, self.optimizer), fileobj)
            if self.fsync:
                fileobj.flush()
                os.fsync(fileobj.fileno())


class PlainCopy(Saver):
    """The floor of any snapshot: copy every tensor of model + optimizer state, write nothing.

    On the CPU each save clones every tensor (fresh memory, as a naive
    snapshot would). On CUDA it copies device to host into pinned buffers
    allocated at the first save and reused (non-blocking copies, ordered on
    the stream before the next step; the caller's clock read synchronizes).
    The copy is kept until the next save, as a snapshot would be.
    """

    writes_file = False

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device
        self._copy: list[torch.Tensor] = []

    def save(self) -> None:
        tensors = tensors_of(raw_state(self.model, self.optimizer))
        if self.device.type != "cuda":
            self._copy = []  # the previous copy goes first: one copy at a time, as a snapshot that was written
            self._copy = [t.detach().clone() for t in tensors]
            return
        if len(self._copy) != len(tensors):
            self._copy = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for buffer, tensor in zip(self._copy, tensors):
            buffer.copy_(tensor.detach(), non_blocking=True)

    def close(self) -> None:
        self._copy = []


class DcpAsyncSave(Saver):
    """``torch.distributed.checkpoint.async_save`` of model + optimizer state, one process, no process group.

    ``no_dist=True`` saves from a single process. The default stager copies
    every tensor to the CPU on the calling thread; the write (its
    ``FileSystemWriter`` fsyncs the files) runs on DCP's thread. Like
    engine_kit, one save at a time: a save waits for the previous one.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        self._async_save = dcp.async_save
        self.model, self.optimizer = model, optimizer
        self.path = directory / "dcp"
        self._future: Any = None

    def save(self) -> None:
        self.drain()
        self._future = self._async_save(raw_state(self.model, self.optimizer), checkpoint_id=self.path, no_dist=True)

    def in_flight(self) -> bool:
        return self._future is not None and not self._future.done()

    def drain(self) -> None:
        if self._future is not None:
            future, self._future = self._future, None
            future.result()  # re-raises a failed write


class LightningAsync(Saver):
    """Lightning's ``AsyncCheckpointIO`` around its ``TorchCheckpointIO``, as ``Trainer`` uses it.

    It clones every tensor on the calling thread and queues the write on one
    thread; it has no back-pressure (a save never waits for the previous one)
    and its ``TorchCheckpointIO`` does not fsync. Saves are counted in and out
    here to know when a write is in flight.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        from lightning_env import import_lightning

        import_lightning()  # its environment variables stay out of the other rows' runs
        from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

        self.model, self.optimizer = model, optimizer
        self.path = directory / "lightning.ckpt"
        self._done = threading.Condition()
        self._submitted = self._finished = 0
        saver = self

        class CountingCheckpointIO(TorchCheckpointIO):
            def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
                try:
                    super().save_checkpoint(*args, **kwargs)
                finally:
                    with saver._done:
                        saver._finished += 1
                        saver._done.notify_all()

        self.io = AsyncCheckpointIO(CountingCheckpointIO())

    def save(self) -> None:
        with self._done:
            self._submitted += 1
        self.io.save_checkpoint(raw_state(self.model, self.optimizer), self.path)

    def in_flight(self) -> bool:
        with self._done:
            return self._finished < self._submitted

    def drain(self) -> None:
        with self._done:
            self._done.wait_for(lambda: self._finished >= self._submitted)

    def close(self) -> None:
        self.drain()
        self.io.teardown()  # re-raises a failed write


class EngineKit(Saver):
    """A ``CheckpointRotation`` save: ``mode`` "sync", "copy" (async, snapshot copied) or "fence" (async, fenced).

    Standalone (:meth:`standalone`) it owns a trainer that ran two steps and
    saves through its epoch-end handler, as at an epoch's end; in a loop
    (:meth:`attach`) it is a ``CheckpointRotation(every_steps=every)`` on the
    loop's trainer. A write is in flight while the rotation's background save
    is pending (the rotation collects a finished one at the next iteration).
    """

    def __init__(self, mode: str, directory: Path) -> None:
        self.mode = mode
        self.holds_next_step = mode == "fence"
        self.directory = directory
        self.rotation: CheckpointRotation | None = None
        self.trainer: Engine | None = None

    def _make_rotation(self, every: int | None) -> CheckpointRotation:
        rotation = CheckpointRotation(self.directory, every_steps=every, at_epoch_end=every is None, keep_last=2,
                                      async_save=self.mode != "sync")
        if self.mode != "sync":
            if not hasattr(rotation, "snapshot_mode"):
                if self.mode == "fence":
                    rotation.close()
                    raise RuntimeError("CheckpointRotation has no snapshot_mode here, so no fence mode")
            else:
                rotation.snapshot_mode = self.mode
        return rotation

    def standalone(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list, device: torch.device) -> EngineKit:
        """Own a trainer that ran two steps (AdamW has its state) and saved once; save() saves again."""
        self.trainer = create_trainer(model, optimizer, torch.nn.functional.mse_loss, device=device)
        self.rotation = self._make_rotation(None)
        self.rotation.attach(self.trainer)
        self.trainer.run(data[:2], max_epochs=1)  # its epoch end saves once; the run's end waits for it
        return self

    def attach(self, trainer: Engine, every: int) -> None:
        self.trainer = trainer
        self.rotation = self._make_rotation(every)
        self.rotation.attach(trainer)  # its run's end waits for the write in flight

    def save(self) -> None:
        assert self.trainer is not None, "standalone() or attach() first"
        self.trainer.fire_event(Events.EPOCH_COMPLETED)  # the rotation's epoch-end save

    def _background(self) -> Any:
        return getattr(self.rotation, "_background", None)

    def in_flight(self) -> bool:
        background = self._background()
        if background is None:
            return False
        # `writing`: the writer thread is still busy; `pending` (older commits) stays True until collected.
        return bool(getattr(background, "writing", background.pending))

    def extras(self) -> dict[str, Any]:
        """Back-pressure waits, seconds the fence held optimizer steps, host bytes of the reused snapshot buffers."""
        background, fence = self._background(), getattr(self.rotation, "_fence", None)
        snapshots = getattr(self.rotation, "_snapshots", None)
        return {"back_pressure_waits": getattr(self.rotation, "waits", None),
                "back_pressure_wait_s": getattr(background, "waited_s", None),
                "fence_held_steps_s": getattr(fence, "waited_s", None),
                "snapshot_buffer_bytes": getattr(snapshots, "nbytes", None)}

    def drain(self) -> None:
        if self.rotation is not None and hasattr(self.rotation, "flush"):
            self.rotation.flush()  # fires CHECKPOINT_SAVED; raises a failed write
            return
        background = self._background()  # commits before flush() existed
        if background is not None:
            background.settle()

    def close(self) -> None:
        if self.rotation is not None:
            self.rotation.close()


def make_saver(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path,
               device: torch.device) -> Saver:
    """A fresh saver for row ``name``, writing under ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    factories: dict[str, Callable[[], Saver]] = {
        TORCH_SAVE: lambda: TorchSave(model, optimizer, directory, fsync=False),
        TORCH_SAVE_FSYNC: lambda: TorchSave(model, optimizer, directory, fsync=True),
        PLAIN_COPY: lambda: PlainCopy(model, optimizer, device),
        DCP_ASYNC: lambda: DcpAsyncSave(model, optimizer, directory),
        LIGHTNING_ASYNC: lambda: LightningAsync(model, optimizer, directory),
        EK_SYNC: lambda: EngineKit("sync", directory / "ekpt"),
        EK_COPY: lambda: EngineKit("copy", directory / "ekpt"),
        EK_FENCE: lambda: EngineKit("fence", directory / "ekpt"),
    }
    return factories[name]()


def unavailable(name: str) -> str | None:
    """Why row ``name`` cannot run with this installation and commit, or None when it can."""
    if name == LIGHTNING_ASYNC:
        try:
            from lightning_env import import_lightning

            import_lightning()  # its environment variables stay out of the other rows' runs
            from lightning.pytorch.plugins.io import AsyncCheckpointIO  # noqa: F401
        except ImportError as err:
            return f"Lightning is not importable ({err}); install the bench extra: pip install -e '.[bench]'"
    if name == DCP_ASYNC and not torch.distributed.is_available():
        return "this torch build has no torch.distributed"
    if name in (EK_COPY, EK_FENCE):
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                rotation = CheckpointRotation(tmp, async_save=True)
            except (TypeError, ValueError) as err:
                return f"CheckpointRotation(async_save=True) is refused at this commit: {err}"
            has_modes = hasattr(rotation, "snapshot_mode")
            rotation.close()
        if name == EK_FENCE and not has_modes:
            return "CheckpointRotation has no fence mode (snapshot_mode) at this commit"
    return None


@contextlib.contextmanager
def saver_directory(root: Path, label: str) -> Iterator[Path]:
    """A fresh directory for one saver under ``root``, removed afterwards (untimed: files pile up otherwise)."""
    directory = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=root))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
