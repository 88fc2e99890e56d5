"""CheckpointRotation: atomic last-k + best-k checkpoints and exact resume."""

from __future__ import annotations

import os
import warnings
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

from engine_kit.checkpoint import CheckpointDirectory, load_checkpoint_file
from engine_kit.errors import fix_message
from engine_kit.events import StepEvents
from engine_kit.stateful import register_stateful, save_refusal
from engine_kit.training_state import capture_training_state, restore_training_state
from handlers.base import Handler
from handlers.events import register_validation_events
from handlers.rotation_policy import Kept, RotationPolicy


def _check_every(every_steps: Any) -> int | None:
    if every_steps is None:
        return None
    if isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 1:
        raise ValueError(fix_message(f"every_steps={every_steps!r} is not an integer >= 1.", "pass every_steps=100, or None."))
    return every_steps


class CheckpointRotation(Handler):
    """Keep the last ``keep_last`` and the best ``keep_best`` checkpoints of a run.

    Saves happen only at accumulation-window boundaries: every ``every_steps``
    optimizer steps (at the end of the iteration that made the step, after the
    other iteration handlers) and at epoch end (after validation). A save that
    falls on an epoch's last iteration waits for the epoch end, so a resumed run
    never skips that epoch's validation. A validation whose metric enters the
    best ``keep_best`` triggers a save at the next such boundary. Attach it
    last, after Validation, EarlyStopping and the loggers.

    Files are written by ``engine_kit.checkpoint.CheckpointDirectory``: atomic,
    fsynced, SHA-256 in a registry, one writer per directory, stale temp files
    swept. Only rank 0 writes. A save vetoed by a handler (NanGuard after a
    non-finite loss) is skipped, so a NaN model is never "last" or "best".

    Args:
        dirname: the checkpoint directory (created; must be writable now).
        every_steps: save every N optimizer steps (None: only at epoch end).
        at_epoch_end: save at every epoch end.
        keep_last: how many of the newest checkpoints to keep.
        keep_best: how many of the best checkpoints (by ``metric``) to keep.
        metric: key of ``trainer.state.val_metrics`` that ranks checkpoints.
        mode: "max" (accuracy) or "min" (loss).
        resume: None (start fresh), "auto" (newest checkpoint that verifies,
            falling back past corrupt ones with a warning) or a file path.
        strict: refuse to resume an fp16 run from a checkpoint without scaler state.

    >>> import tempfile
    >>> rotation = CheckpointRotation(tempfile.mkdtemp(), every_steps=10, keep_last=2)
    >>> rotation.policy.keep_last
    2
    """

    state_keys = ("validations_seen", "last_saved_step")

    def __init__(
        self,
        dirname: str | os.PathLike[str],
        *,
        every_steps: int | None = None,
        at_epoch_end: bool = True,
        keep_last: int = 2,
        keep_best: int = 0,
        metric: str | None = None,
        mode: str = "max",
        resume: str | os.PathLike[str] | None = None,
        strict: bool = True,
    ) -> None:
        super().__init__()
        self.every_steps = _check_every(every_steps)
        self.at_epoch_end = bool(at_epoch_end)
        self.policy = RotationPolicy(keep_last=keep_last, keep_best=keep_best, mode=mode)
        if keep_best and not metric:
            raise ValueError(fix_message(f"keep_best={keep_best} needs a metric to rank by.", "pass metric='accuracy' (a key of the validation metrics)."))
        self.metric = metric
        if resume is not None and resume != "auto" and not os.path.isfile(resume):
            raise FileNotFoundError(fix_message(f"resume={str(resume)!r} is not a file.", "pass resume='auto', None, or the path of a .ekpt file."))
        self.resume = resume
        self.strict = strict
        self.dirname = os.path.abspath(os.fspath(dirname))
        self.writer = idist.get_rank() == 0
        # Opened now so that an unwritable directory fails at construction, not hours later.
        self.directory: CheckpointDirectory | None = CheckpointDirectory(self.dirname) if self.writer else None
        self.validations_seen = 0
        self.last_saved_step = -1
        self._due = False
        self.resumed_from: str | None = None

    def attach(self, trainer: Engine) -> None:
        """Register on ``trainer`` (a ``create_trainer`` engine)."""
        self._claim(trainer)
        register_stateful(trainer, "checkpoint_rotation", self)
        register_validation_events(trainer)
        trainer.state.resumed_from = None
        if self.resume is not None:
            trainer.add_event_handler(Events.STARTED, self._resume)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)
        trainer.add_event_handler(Events.COMPLETED, lambda: self.close())

    def close(self) -> None:
        """Release the directory lock (a later save reopens it)."""
        if self.directory is not None:
            self.directory.close()
            self.directory = None

    def _open(self) -> CheckpointDirectory:
        if self.directory is None:
            self.directory = CheckpointDirectory(self.dirname)
        return self.directory

    # -- when to save ------------------------------------------------------
    def __call__(self, engine: Engine) -> None:
        state = engine.state
        if state.window_position != 0 or state.optimizer_steps == self.last_saved_step:
            return  # inside a window, or nothing new since the last save
        due = self.every_steps is not None and state.optimizer_steps > 0 and state.optimizer_steps % self.every_steps == 0
        if not (due or self._best_pending(engine)):
            return
        if state.epoch_length is not None and state.iteration % state.epoch_length == 0:
            self._due = True  # the epoch's last iteration: save after the epoch-end handlers
            return
        self._save(engine)

    def _on_epoch_completed(self, engine: Engine) -> None:
        if self.at_epoch_end or self._due or self._best_pending(engine):
            self._save(engine)
        self._due = False

    def _new_metric(self, engine: Engine) -> float | None:
        if self.metric is None or engine.state.validations <= self.validations_seen:
            return None
        metrics = engine.state.val_metrics
        if self.metric not in metrics:
            raise KeyError(fix_message(f"metric {self.metric!r} is not among the validation metrics {sorted(metrics)}.", "pass one of those as metric=."))
        return float(metrics[self.metric])

    def _best_pending(self, engine: Engine) -> bool:
        metric = self._new_metric(engine)
        if metric is None or not self.writer:
            return False
        kept = [Kept(e.name, e.step, e.metric) for e in self._open().entries()]
        return self.policy.would_keep(kept, metric)

    # -- saving ------------------------------------------------------------
    def _save(self, engine: Engine) -> None:
        state = engine.state
        metric = self._new_metric(engine)
        self.validations_seen = state.validations
        self.last_saved_step = state.optimizer_steps
        if not self.writer:
            return
        refusal = save_refusal(engine)
        if refusal:
            warnings.warn(f"CheckpointRotation: not saving at step {state.optimizer_steps}: {refusal}", stacklevel=2)
            return
        directory = self._open()
        kept = [Kept(e.name, e.step, e.metric) for e in directory.entries()]
        name = f"step{state.optimizer_steps:08d}-{state.checkpoints_saved + 1:05d}.ekpt"
        new = Kept(name, state.optimizer_steps, metric)
        kept_after, dropped = self.policy.admit(kept, new)
        if name in dropped:
            return  # best-only rotation and this one is not among the best
        state.checkpoints_saved += 1
        try:
            payload = capture_training_state(engine, metric=metric)
            tags = next(k.tags for k in kept_after if k.name == name)
            directory.commit(name, payload, step=state.optimizer_steps, epoch=state.epoch, tags=sorted(tags), metric=metric)
        except BaseException:
            state.checkpoints_saved -= 1
            raise
        directory.retag({k.name: sorted(k.tags) for k in kept_after})
        if dropped:
            directory.remove(dropped)
        engine.state.last_checkpoint = os.path.join(self.dirname, name)
        engine.fire_event(StepEvents.CHECKPOINT_SAVED)

    def best(self) -> dict[str, Any] | None:
        """The best kept checkpoint: {name, path, step, metric}, or None."""
        directory = self.directory or CheckpointDirectory(self.dirname, read_only=True)
        ranked = self.policy.ranked([Kept(e.name, e.step, e.metric) for e in directory.entries()])
        if not ranked:
            return None
        top = ranked[0]
        return {"name": top.name, "path": os.path.join(self.dirname, top.name), "step": top.step, "metric": top.metric}

    # -- resuming ----------------------------------------------------------
    def _resume(self, engine: Engine) -> None:
        if self.resume == "auto":
            reader = self.directory or CheckpointDirectory(self.dirname, read_only=True)
            found = reader.load_newest_valid()
            if found is None:
                return  # nothing saved yet: a fresh start
            entry, payload = found
            path = os.path.join(self.dirname, entry.name)
        else:
            path = os.path.abspath(os.fspath(self.resume))
            payload = load_checkpoint_file(path)
        restore_training_state(engine, payload, strict=self.strict)
        self.resumed_from = path
        engine.state.resumed_from = path
        self._forget_abandoned_future(engine)

    def _forget_abandoned_future(self, engine: Engine) -> None:
        """Drop checkpoints newer than the one resumed from: the resumed run re-creates them."""
        if self.directory is None:
            return
        newer = [e.name for e in self.directory.entries() if e.step > engine.state.optimizer_steps]
        if newer:
            warnings.warn(f"CheckpointRotation: resuming from step {engine.state.optimizer_steps}; removing newer checkpoints {newer}.", stacklevel=2)
            self.directory.remove(newer)
