"""CheckpointRotation: atomic last-k + best-k checkpoints and exact resume."""

from __future__ import annotations

import os
import uuid
import warnings
from dataclasses import replace
from functools import partial
from collections.abc import Callable
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

from engine_kit.checkpoint import CheckpointDirectory, load_checkpoint_file
from engine_kit.checkpoint.serialized import INLINE_LIMIT_BYTES, serialize_small
from engine_kit.checkpoint.snapshot import SnapshotBuffers
from engine_kit.distributed import add_rank_states, agree, decide, gather_rank_states, is_multiprocess
from engine_kit.distributed.resume import check_run_start, resume_every_rank
from engine_kit.checks import check_bool, check_int, check_path
from engine_kit.errors import fix_message
from engine_kit.events import StepEvents
from engine_kit.stateful import register_stateful, save_refusal
from engine_kit.engine import cleanup_handler
from engine_kit.resume_checks import unwrap_model
from engine_kit.training_state import capture_training_state, restore_training_state
from engine_kit.checkpoint.background import BackgroundSaves
from handlers.save_fence import StepFence, fenced_storages
from handlers.base import Handler
from handlers.checkpoint_resume import branch_from, refuse_foreign_checkpoints
from handlers.events import register_validation_events
from handlers.rotation_policy import Kept, RotationPolicy


ERROR_WAIT_S = 300.0
"""How long a failing run waits for the background write in flight before it lets the error go on."""
SNAPSHOT_MODES = ("copy", "fence")


def _kept(directory: CheckpointDirectory) -> list[Kept]:
    """The directory's indexed checkpoints as the rotation policy ranks them."""
    return [Kept(e.name, e.step, e.metric) for e in directory.entries()]


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
        resume: None (start fresh: refused when the directory already holds
            checkpoints, which are never overwritten), "auto" (newest checkpoint
            that verifies, falling back past corrupt ones with a warning) or the
            path of a checkpoint file. Resuming from a file older than the
            directory's newest branches the run: the newer checkpoints are moved,
            never deleted, into a ``branched-from-step...`` subfolder.
        strict: refuse a resume that would not continue the run exactly
            (precision, accumulation, data order, schedulers ...: see
            ``engine_kit.resume_checks``); ``False`` accepts it and warns
            listing every difference.
        async_save: write on a background thread (the default): the training
            thread only copies the state into host buffers kept from one save
            to the next (on CUDA a non-blocking copy into pinned memory);
            serializing, hashing, fsyncing, indexing and rotating overlap
            training. A small state on the CPU (tensors up to
            ``inline_limit_bytes``, 4 MiB) is serialized on the training
            thread instead, which costs it less than the copy plus a writer
            thread holding the interpreter lock while it pickles; hashing,
            fsyncing, indexing and rotating still overlap training. The files
            are the same as synchronous ones. One save in
            flight at a time: a save due while the previous one is still being
            written waits for it (counted in :attr:`waits`, logged at the 1st,
            10th, 100th... wait). ``CHECKPOINT_SAVED`` fires on the training thread once the
            file is durable (``trainer.state.last_checkpoint`` names it); a
            failed write raises ``CheckpointWriteError`` at the next iteration,
            naming the file and the cause. The run's end waits for the write in
            flight: on completion, on an error (its failure then becomes a note
            on the run's error), on ``engine.interrupt()`` and before a
            preemption's last save (written synchronously). ``False``: every
            save is written on the training thread.

    Multi-process runs: rank 0 writes in the background and the other ranks
    never wait for it mid-epoch. A failed background write is not raised at
    an iteration (rank 0 alone would stop while the others wait in their
    next collective): it surfaces at the next point every rank reaches
    together — the next save's agreement or the run's end — as the same
    ``RankAgreementError`` on every rank.

    The attribute ``snapshot_mode`` selects how a background save captures
    the state: ``"copy"`` (the default, described above) or ``"fence"``
    (CPU weights and optimizer state are not copied; the next optimizer step
    waits until they are serialized, see :mod:`handlers.save_fence`). The
    attribute ``inline_limit_bytes`` sets the size up to which a ``"copy"``
    save serializes on the training thread (0: never).

    Every run has a ``run_id`` (kept in its checkpoints, so a resumed run keeps
    it) and names its files with ``CheckpointDirectory.next_name``: names are
    never reused, not even after the directory's index was lost.

    >>> import tempfile
    >>> rotation = CheckpointRotation(tempfile.mkdtemp(), every_steps=10, keep_last=2)
    >>> rotation.policy.keep_last
    2
    """

    state_keys = ("validations_seen", "last_saved_step", "run_id")

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
        async_save: bool = True,
    ) -> None:
        super().__init__()
        check_path("dirname", dirname, "runs/exp1/checkpoints")
        self.every_steps = _check_every(every_steps)
        self.at_epoch_end = check_bool("at_epoch_end", at_epoch_end)
        check_bool("strict", strict)
        if resume is not None and resume != "auto":
            check_path("resume", resume, "runs/exp1/checkpoints/step00000100-00002.ekpt")
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
        if resume is None and self.directory is not None:
            refuse_foreign_checkpoints(self.directory)
        self.run_id = uuid.uuid4().hex[:16]  # a resumed run takes its checkpoint's id instead
        self.validations_seen = 0
        self.last_saved_step = -1
        self._due = False
        self.resumed_from: str | None = None
        self._background = BackgroundSaves() if check_bool("async_save", async_save) else None
        self._snapshots = SnapshotBuffers()  # host copies of the state, reused by every background save
        self._inline_limit_bytes = INLINE_LIMIT_BYTES
        self._snapshot_mode = "copy"  # or "fence": see handlers.save_fence
        self._fence: StepFence | None = None

    @property
    def snapshot_mode(self) -> str:
        """How a background save captures the state: ``"copy"`` (the default) or ``"fence"`` (see the class docstring)."""
        return self._snapshot_mode

    @snapshot_mode.setter
    def snapshot_mode(self, mode: str) -> None:
        if mode not in SNAPSHOT_MODES:  # checked here, not at the first save minutes later
            raise ValueError(fix_message(f"snapshot_mode={mode!r} is not 'copy' or 'fence'.", "set 'copy' (the default) or 'fence'."))
        self._snapshot_mode = mode

    @property
    def inline_limit_bytes(self) -> int:
        """Tensor bytes up to which a ``"copy"`` background save of a CPU state serializes on the training thread (0: never)."""
        return self._inline_limit_bytes

    @inline_limit_bytes.setter
    def inline_limit_bytes(self, limit: int) -> None:
        self._inline_limit_bytes = check_int("inline_limit_bytes", limit, minimum=0, example=INLINE_LIMIT_BYTES)

    def attach(self, trainer: Engine) -> None:
        """Register on ``trainer`` (a ``create_trainer`` engine)."""
        self._claim(trainer)
        register_stateful(trainer, "checkpoint_rotation", self)
        register_validation_events(trainer)
        trainer.state.resumed_from = None
        # Refuses a sharded (FSDP2) model; multi-process: syncs with rank 0 (which created the directory), refuses node-local ones.
        trainer.add_event_handler(Events.STARTED, lambda engine: check_run_start(engine, self.dirname))
        trainer.add_event_handler(Events.STARTED, self._on_started)
        if self.resume is not None:
            trainer.add_event_handler(Events.STARTED, self._resume)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)
        # A failed run still waits for the save in flight; its failure becomes a note on the run's error.
        trainer.add_event_handler(Events.EXCEPTION_RAISED, cleanup_handler(lambda engine, error: self._settle(timeout_s=ERROR_WAIT_S)))
        # engine.interrupt(): run() returns until the next run() resumes; the save in flight is finished first.
        trainer.add_event_handler(Events.INTERRUPT, self._finish_pending)
        # Every rank waits here, so none exits while rank 0 still writes (and a failure reaches all).
        trainer.add_event_handler(Events.COMPLETED, lambda: agree("finish the run", self.close))

    @property
    def waits(self) -> int:
        """How many saves had to wait for the previous background write (back-pressure)."""
        return self._background.waits if self._background is not None else 0

    def flush(self) -> None:
        """Wait for the background write in flight, if any, and collect its outcome now.

        On success ``CHECKPOINT_SAVED`` fires (the file is durable); a failed
        write raises ``CheckpointWriteError``. Synchronous saves: nothing to do.
        """
        self._settle()

    def close(self) -> None:
        """Wait for a background save in flight, then let the writer thread exit and release the directory lock.

        A later save starts a writer and reopens the directory.
        """
        try:
            self._settle()
        finally:
            if self._background is not None:
                self._background.stop_writer()  # as CheckpointDirectory.close does for its own writer
            if self._fence is not None:
                self._fence.disarm()  # the next run's first fenced save arms it again
            if self.directory is not None:
                self.directory.close()
                self.directory = None

    def _on_started(self, engine: Engine) -> None:
        engine.state.checkpoint_waits = self.waits
        if self._background is not None:
            # Multi-process: a failure waits for a point every rank reaches (see the class docstring).
            self._background.defer_failures = is_multiprocess()
        self._finish_pending()  # an earlier run's save (after an interrupt): its outcome first

    def _finish_pending(self) -> None:
        """Wait for the write in flight and collect its outcome (multi-process: a failure is kept for the ranks)."""
        if self._background is not None:
            self._background.finish()

    def _open(self) -> CheckpointDirectory:
        if self.directory is None:
            self.directory = CheckpointDirectory(self.dirname)
        return self.directory

    # -- when to save ------------------------------------------------------
    def __call__(self, engine: Engine) -> None:
        background = self._background
        if background is not None and background.job is not None:  # attribute checks only: it runs every micro-batch
            background.poll()  # a finished background save: CHECKPOINT_SAVED, or its error, now
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
        if metric is None:
            return False
        # Only rank 0 reads the directory (once its save in flight is done), and every rank must take the same decision.
        return decide("rank the new metric", lambda: self._would_keep(metric))

    def _would_keep(self, metric: float) -> bool:
        self._settle()
        return self.policy.would_keep(_kept(self._open()), metric)

    # -- saving ------------------------------------------------------------
    def save_now(self, engine: Engine, reason: str) -> bool:
        """Save at this window boundary whatever ``every_steps`` says (a preemption's last checkpoint).

        The save counts as one of the ``keep_last`` newest even with ``keep_last=0``,
        so it survives until the resumed run's next save ranks it out. Returns
        True when a checkpoint of this step exists afterwards.
        """
        if engine.state.window_position != 0:
            problem = f"save_now({reason!r}) inside an accumulation window (position {engine.state.window_position})."
            raise RuntimeError(fix_message(problem, "call it at a window boundary (window_position == 0)."))
        if engine.state.optimizer_steps == self.last_saved_step:
            return True  # this very step is already saved
        return self._save(engine, keep_at_least_one=True)

    def _save(self, engine: Engine, *, keep_at_least_one: bool = False) -> bool:
        # Every rank hands rank 0 its own RNG and data state, and learns how the write went (a barrier).
        rank_states = gather_rank_states(engine.state.dataloader)
        write = lambda: self._write(engine, rank_states, keep_at_least_one)  # noqa: E731
        return agree(f"save the checkpoint of step {engine.state.optimizer_steps}", write)

    def _write(self, engine: Engine, rank_states: list[dict[str, Any]] | None, keep_at_least_one: bool) -> bool:
        state = engine.state
        metric = self._new_metric(engine)
        self.validations_seen = state.validations
        self.last_saved_step = state.optimizer_steps
        if not self.writer:
            return True
        refusal = save_refusal(engine)
        if refusal:
            warnings.warn(f"CheckpointRotation: not saving at step {state.optimizer_steps}: {refusal}", stacklevel=2)
            return False
        # The directory (and the snapshot buffers) are the writer's until the save in flight is done.
        self._settle(back_pressure=not keep_at_least_one)
        state.checkpoint_waits = self.waits
        directory = self._open()
        kept = _kept(directory)
        name = directory.next_name(state.optimizer_steps)  # never an existing or former name
        new = Kept(name, state.optimizer_steps, metric)
        policy = replace(self.policy, keep_last=max(1, self.policy.keep_last)) if keep_at_least_one else self.policy
        kept_after, dropped = policy.admit(kept, new)
        if name in dropped:
            return False  # best-only rotation and this one is not among the best
        state.checkpoints_saved += 1
        try:
            payload = add_rank_states(capture_training_state(engine, metric=metric), rank_states)
            tags = next(k.tags for k in kept_after if k.name == name)
            # One index write and two fsyncs; the ranked-out files go only once the new one is durable.
            commit = partial(directory.commit, name, step=state.optimizer_steps, epoch=state.epoch, tags=sorted(tags), metric=metric,
                             run_id=self.run_id, retag={k.name: sorted(k.tags) for k in kept_after}, rotate_out=dropped)
            saved = partial(self._saved, engine, name, state.optimizer_steps)
            if self._background is None or keep_at_least_one:
                commit(self._on_host(engine, payload))  # synchronous: asked for, or a preemption's last save
            else:
                self._submit(engine, payload, commit, saved, os.path.join(self.dirname, name))
                return True
        except BaseException:
            state.checkpoints_saved -= 1
            raise
        saved()
        return True

    def _on_host(self, engine: Engine, payload: dict[str, Any]) -> dict[str, Any]:
        """A synchronous save of a CUDA model writes the same host copy a background save would (the same bytes)."""
        if not any(p.is_cuda for p in unwrap_model(engine.step.model).parameters()):
            return payload
        snapshot = self._snapshots.capture(payload)
        snapshot.wait_ready()
        return snapshot.payload

    def _submit(self, engine: Engine, payload: dict[str, Any], commit: Callable[..., Any], saved: Callable[[], None], path: str) -> None:
        """Snapshot (or serialize, when small) ``payload`` on the training thread, then write it on the writer thread."""
        if self._snapshot_mode == "copy" and self._inline_limit_bytes > 0:
            serialized = serialize_small(payload, limit_bytes=self._inline_limit_bytes)
            if serialized is not None:
                self._background.submit(lambda done: commit(serialized, on_serialized=done), saved, path=path)
                return
        shared: frozenset[int] = frozenset()
        if self._snapshot_mode == "fence":
            step = engine.step
            shared = fenced_storages(unwrap_model(step.model), step.optimizer)
            if self._fence is None:
                self._fence = StepFence(self._background.wait_serialized)
            self._fence.arm(step.optimizer)
        snapshot = self._snapshots.capture(payload, shared=shared)

        def write(serialized: Callable[[], None]) -> None:
            snapshot.wait_ready()  # CUDA: the device-to-host copies have landed
            commit(snapshot.payload, on_serialized=serialized)

        self._background.submit(write, saved, path=path)

    def _saved(self, engine: Engine, name: str, step: int) -> None:
        """A checkpoint is durable: say so (on the training thread)."""
        engine.state.last_checkpoint = os.path.join(self.dirname, name)
        engine.state.last_checkpoint_step = step  # a background save is announced some iterations after its step
        engine.fire_event(StepEvents.CHECKPOINT_SAVED)

    def _settle(self, *, back_pressure: bool = False, timeout_s: float | None = None) -> None:
        """Wait for a background save in flight (CheckpointWriteError if it failed)."""
        if self._background is not None:
            self._background.settle(back_pressure=back_pressure, timeout_s=timeout_s)

    def best(self) -> dict[str, Any] | None:
        """The best kept checkpoint: {name, path, step, metric}, or None."""
        self._settle()
        directory = self.directory or CheckpointDirectory(self.dirname, read_only=True)
        ranked = self.policy.ranked(_kept(directory))
        if not ranked:
            return None
        top = ranked[0]
        return {"name": top.name, "path": os.path.join(self.dirname, top.name), "step": top.step, "metric": top.metric}

    # -- resuming ----------------------------------------------------------
    def _resume(self, engine: Engine) -> None:
        if is_multiprocess():
            path = resume_every_rank(engine, dirname=self.dirname, resume=self.resume, open_directory=self._open, strict=self.strict)
            if path is not None:
                self._resumed(engine, path)
            return
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
        self._resumed(engine, path)

    def _resumed(self, engine: Engine, path: str) -> None:
        self.resumed_from = path
        engine.state.resumed_from = path
        if self.resume != "auto" and self.directory is not None:
            branch_from(self.directory, engine.state.optimizer_steps, path)
