"""Doctor: runs the ``engine_kit.doctor`` checks during training, at no per-iteration cost in steady state."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Mapping

import ignite.distributed as idist
from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle

from engine_kit.doctor import (
    BatchWaitClock,
    DoctorSettings,
    Finding,
    LossProbe,
    add_new,
    check_batch_device,
    check_batchnorm_accumulation,
    check_best_kept,
    check_data_wait,
    check_gradients_received,
    check_overfitting,
    check_parameters,
    check_schedule,
    check_train_mode,
    check_validation_data,
    check_weight_decay,
    parameter_groups_with_non_finite,
    planned_optimizer_steps,
)
from engine_kit.doctor.step_checks import check_steps_after, first_non_finite
from engine_kit.doctor.validation_checks import loss_key
from engine_kit.engine import cleanup_handler
from engine_kit.errors import fix_message
from engine_kit.events import StepEvents
from engine_kit.stateful import stateful_objects
from handlers.base import Handler, check_state_keys, require_step_events
from handlers.checkpoint import CheckpointRotation
from handlers.event_file import write_texts
from handlers.events import ValidationEvents, register_validation_events
from handlers.grad_norm import GradNormLogger
from handlers.step_log import StepLog
from handlers.step_rows import StepRows
from handlers.tensorboard import TensorBoardLogger
from handlers.validation import Validation

logger = logging.getLogger("engine_kit.doctor")


class Doctor(Handler):
    """Finds the classic training mistakes while the run goes and says how to fix each.

    When it looks (every check is a function of ``engine_kit.doctor``):

    * when the run starts, before the first step: parameters (all frozen, not
      in the optimizer), BatchNorm with accumulation, weight decay on biases
      and norms, the schedule's length against the run's optimizer steps, a
      shuffled or overlapping validation set, ``keep_best=0`` with validation;
    * on the first ``settings.first_batches`` micro-batches: what the loss
      functions receive (logits or probabilities), the batches' device,
      which parameters get gradients; over the next
      ``settings.timing_iterations`` iterations, host clocks time the wait
      for batches. Then these per-iteration handlers detach themselves;
    * at each validation and each epoch end: the model left in eval mode,
      overfitting, and (each time the run has doubled its optimizer steps,
      and at the end) the step-log checks: loss not falling, gradient norm
      rising, clipping share, first NaN/inf. They read values other handlers
      already brought to the host (``StepRows``): ``GradNormLogger``'s norms
      and the first rows of ``StepLog``'s file; nothing on the device.

    So in steady state the doctor adds no work per iteration and no host
    sync. Without a ``StepLog`` on the trainer it keeps each step's loss and
    norm tensors itself (one list append per step) and reads them at epoch end.

    Each finding is reported once: one line on the ``engine_kit.doctor``
    logger (warning level; Python prints it to stderr when logging is not
    configured), a TensorBoard text (``doctor/<code>``, through ``writer`` or
    the writer of the trainer's ``TensorBoardLogger``), ``findings`` and
    ``trainer.state.doctor_findings``, and ``path`` (``doctor.json``: the
    findings and the facts they were judged by, which ``engine-kit doctor``
    and the run report read). Only rank 0 reports.

    Args:
        path: where to write the findings as JSON (None: not written).
        writer: a tensorboardX ``SummaryWriter`` for the text records (default:
            the trainer's ``TensorBoardLogger``'s, if any).
        val_loader: a validation loader run by your own code (``Validation``
            handlers on the trainer are found by themselves).
        train_data: the training dataset, for the overlap check (default: the
            ``Validation``'s ``train_data``, else the data passed to ``run``).
        settings: the thresholds (``engine_kit.doctor.DoctorSettings``).

    >>> import torch
    >>> from engine_kit import create_trainer
    >>> model = torch.nn.Linear(2, 1)
    >>> trainer = create_trainer(model, torch.optim.AdamW(model.parameters()), torch.nn.functional.mse_loss)
    >>> doctor = Doctor()
    >>> doctor.attach(trainer)
    >>> _ = trainer.run([(torch.randn(4, 2), torch.randn(4, 1))] * 3, max_epochs=1)
    >>> [finding.code for finding in doctor.findings]
    ['weight-decay-on-norms']
    """

    state_keys = ("findings",)

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,
        writer: Any = None,
        val_loader: Any = None,
        train_data: Any = None,
        settings: DoctorSettings | None = None,
    ) -> None:
        super().__init__()
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(fix_message(f"path={path!r} is not a path.", "pass a file path such as 'runs/exp1/doctor.json'."))
        if writer is not None and not hasattr(writer, "add_text"):
            raise TypeError(
                fix_message(f"writer is a {type(writer).__name__} without add_text.",
                            "pass a tensorboardX.SummaryWriter, or None to use the TensorBoardLogger's.")
            )
        if settings is not None and not isinstance(settings, DoctorSettings):
            raise TypeError(
                fix_message(f"settings is a {type(settings).__name__}.",
                            "pass engine_kit.doctor.DoctorSettings(...), or None for the defaults.")
            )
        self.path = None if path is None else os.fspath(path)
        self.writer = writer
        self.val_loader = val_loader
        self.train_data = train_data
        self.settings = settings or DoctorSettings()
        self.findings: list[Finding] = []
        self._trainer: Engine | None = None
        self._reporting = True
        self._rows = StepRows()
        self._planned = 0
        self._clock = BatchWaitClock(self.settings.timing_iterations)
        self._batches_checked = 0
        self._windows_seen = 0
        self._reviewed_steps = 0
        self._with_gradient: set[int] = set()
        self._handles: dict[str, RemovableEventHandle] = {}
        self._written: tuple[str, str] | None = None  # (path, text) of doctor.json as last written

    # -- wiring ----------------------------------------------------------------
    def attach(self, trainer: Engine) -> None:
        """Check ``trainer`` (an ``engine_kit.create_trainer`` engine) from its start to its end."""
        require_step_events(trainer, type(self).__name__)
        if not all(hasattr(getattr(trainer, "step", None), name) for name in ("model", "optimizer", "loss_fn")):
            raise TypeError(
                fix_message("the trainer has no step with model, optimizer and loss_fn.",
                            "attach the doctor to the engine that engine_kit.create_trainer(...) returned.")
            )
        self._claim(trainer)
        self._trainer = trainer
        self._reporting = idist.get_rank() == 0
        register_validation_events(trainer)
        trainer.state.doctor_findings = self.findings
        trainer.add_event_handler(Events.STARTED, self._before_first_step)
        for name, event, handler in (
            ("requested", Events.GET_BATCH_STARTED, self._batch_requested),
            ("fetched", Events.GET_BATCH_COMPLETED, self._batch_fetched),
            ("gradients", StepEvents.GRADIENTS_READY, self._gradients_ready),
        ):
            self._handles[name] = trainer.add_event_handler(event, handler)
        trainer.add_event_handler(ValidationEvents.VALIDATION_COMPLETED, self._after_validation)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._after_epoch)
        for event in (Events.COMPLETED, Events.TERMINATE):
            trainer.add_event_handler(event, self._finish)
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)

    def _detach(self, name: str) -> None:
        handle = self._handles.pop(name, None)
        if handle is not None:
            handle.remove()

    def _others(self, engine: Engine, kind: type) -> list[Any]:
        return [obj for obj in stateful_objects(engine).values() if isinstance(obj, kind)]

    # -- reporting -------------------------------------------------------------
    def report(self, findings: list[Finding]) -> None:
        """Record the findings not reported yet: log line, TensorBoard text, ``path``."""
        new = add_new(self.findings, findings)
        if not new or not self._reporting:
            return
        for finding in new:
            logger.warning(finding.line())
        writer = self._writer()
        if writer is not None:
            write_texts(writer, [(finding.step, f"doctor/{finding.code}", finding.line()) for finding in new])
        self._write()

    def _writer(self) -> Any:
        if self.writer is not None:
            return self.writer
        loggers = self._others(self._trainer, TensorBoardLogger) if self._trainer is not None else []
        return loggers[0].writer if loggers else None

    def _context(self) -> dict[str, Any]:
        trainer = self._trainer
        step = getattr(trainer, "step", None)
        rotations = self._others(trainer, CheckpointRotation) if trainer is not None else []
        best = rotations[0].best() if rotations and rotations[0].policy.keep_best else None
        return {
            "max_grad_norm": getattr(step, "max_grad_norm", None),
            "accumulation_steps": getattr(step, "accumulation_steps", None),
            "planned_steps": self._planned,
            "val_history": list(getattr(getattr(trainer, "state", None), "val_history", []) or []),
            "best_checkpoint": best and best.get("name"),
            "settings": {field.name: getattr(self.settings, field.name) for field in dataclasses.fields(self.settings)},
        }

    def _write(self) -> None:
        if self.path is None or not self._reporting:
            return
        text = doctor_json([f.to_dict() for f in self.findings], self._context())
        if self._written == (self.path, text):
            return  # the file already says this (a report at the run's end, then its final write)
        temporary = f"{self.path}.tmp"
        with open(temporary, "wb") as f:
            f.write(text.encode("utf-8"))
        os.replace(temporary, self.path)
        self._written = (self.path, text)

    # -- before the first step -------------------------------------------------
    def _before_first_step(self, engine: Engine) -> None:
        step, state = engine.step, engine.state
        model, optimizer = step.model, step.optimizer
        findings = check_parameters(model, optimizer)
        findings += check_batchnorm_accumulation(model, step.accumulation_steps)
        findings += check_weight_decay(model, optimizer)
        if state.epoch_length:
            self._planned = planned_optimizer_steps(state.epoch_length, state.max_epochs, step.accumulation_steps)
            findings += check_schedule(getattr(state, "lr_schedulers", []), self._planned, self.settings)
        validations = self._others(engine, Validation)
        val_loaders = [v.loader for v in validations] + ([self.val_loader] if self.val_loader is not None else [])
        given = [self.train_data] + [v.train_data for v in validations]
        train_data = next((data for data in given if data is not None), state.dataloader)
        for loader in val_loaders:
            findings += check_validation_data(train_data, loader, self.settings)
        for rotation in self._others(engine, CheckpointRotation):
            findings += check_best_kept(rotation.policy.keep_best, bool(val_loaders), rotation.metric)
        self._rows.step_log = next((log for log in self._others(engine, StepLog) if log._enabled), None)
        self._rows.grad_norms = next(iter(self._others(engine, GradNormLogger)), None)
        self._rows.max_grad_norm = step.max_grad_norm
        if self._rows.step_log is None and "record" not in self._handles:
            self._handles["record"] = engine.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, self._rows.record)
        if not isinstance(step.loss_fn, LossProbe):
            step.loss_fn = LossProbe(step.loss_fn, self.settings.first_batches, self.report, self._restore_loss(step))
        self.report(findings)

    @staticmethod
    def _restore_loss(step: Any) -> Callable[[Callable], None]:
        def restore(loss_fn: Callable) -> None:
            step.loss_fn = loss_fn

        return restore

    # -- the first iterations --------------------------------------------------
    def _batch_requested(self, engine: Engine) -> None:
        if engine.state.iteration >= 2:  # the first batches pay for worker start-up: not steady state
            self._clock.started(engine.state.epoch)

    def _batch_fetched(self, engine: Engine) -> None:
        state = engine.state
        self._clock.fetched()
        if self._batches_checked < self.settings.first_batches:
            self._batches_checked += 1
            self.report(check_batch_device(state.batch, engine.step.device, state.iteration + 1))
        if self._clock.done:
            self._detach("requested")
            self._detach("fetched")
            self._report_data_wait(engine)

    def _report_data_wait(self, engine: Engine) -> None:
        self.report(check_data_wait(self._clock, engine.state.dataloader, engine.step.device, self.settings,
                                    engine.state.optimizer_steps))
        self._clock.totals.clear()

    def _gradients_ready(self, engine: Engine) -> None:
        # Whether .grad is set is host bookkeeping: reading it touches no device memory.
        model = engine.step.model
        self._with_gradient.update(id(p) for p in model.parameters() if p.grad is not None)
        self._windows_seen += 1
        if self._windows_seen >= self.settings.first_batches:
            self._detach("gradients")
            self.report(check_gradients_received(model, self._with_gradient, self._windows_seen))

    # -- validations, epochs, the end -----------------------------------------
    def _after_validation(self, engine: Engine) -> None:
        self.report(check_train_mode(engine.step.model, f"validation {engine.state.validations}",
                                     engine.state.optimizer_steps))
        history = engine.state.val_history
        if "overfitting" in self.codes or len(history) <= self.settings.overfit_validations or not loss_key(history):
            return  # nothing to judge yet: the step log is not read
        rotations = self._others(engine, CheckpointRotation)
        best = rotations[0].best() if rotations and rotations[0].policy.keep_best else None
        rows = self._rows.rows(self.settings.loss_window, complete=True)  # losses between validations
        self.report(check_overfitting(history, rows, self.settings, best and best.get("name")))

    def _after_epoch(self, engine: Engine) -> None:
        self.report(check_train_mode(engine.step.model, f"the end of epoch {engine.state.epoch}",
                                     engine.state.optimizer_steps))
        self._review(engine, final=False)

    def _review(self, engine: Engine, *, final: bool) -> None:
        steps = engine.state.optimizer_steps
        if not final and steps < 2 * self._reviewed_steps:
            return  # judged again once the run has doubled its steps: all reviews together cost O(steps)
        if final and steps == self._reviewed_steps and steps >= self.settings.loss_window:
            return  # the last epoch's review saw every step, and the loss window was complete
        self._reviewed_steps = max(steps, 1)
        rows = self._rows.rows(self.settings.loss_window)
        bad = first_non_finite(rows)
        if getattr(engine.state, "nan_detected", False) or bad is not None:
            rows = self._rows.rows(self.settings.loss_window, complete=True)  # to name the step and the loss
            bad = first_non_finite(rows)
        bad_groups = None
        if final and bad is not None and "non-finite" not in self.codes:
            bad_groups = parameter_groups_with_non_finite(engine.step.optimizer)  # once, at the end
        found = check_steps_after(rows, bad, engine.step.max_grad_norm, self._planned or len(rows), self.settings,
                                  final=final, bad_groups=bad_groups)
        if final:
            self._refresh(found)
        self.report(found)

    def _refresh(self, findings: list[Finding]) -> None:
        """Give findings already reported the evidence of the whole run (no second log line)."""
        latest = {finding.code: finding for finding in findings}
        for i, finding in enumerate(self.findings):
            if finding.code in latest and finding.code != "non-finite":  # the first NaN stays the first
                self.findings[i] = latest[finding.code]

    def _finish(self, engine: Engine) -> None:
        step = engine.step
        if isinstance(step.loss_fn, LossProbe):  # fewer batches than probed: judge those seen
            step.loss_fn.finish()
        if "gradients" in self._handles and self._windows_seen:
            self._detach("gradients")
            self.report(check_gradients_received(step.model, self._with_gradient, self._windows_seen))
        if "fetched" in self._handles and len(self._clock.totals) >= 8:
            self._report_data_wait(engine)
        self._review(engine, final=True)
        self._write()

    @cleanup_handler  # reports what it found, never swallows the run's error (a failure here becomes a note)
    def _on_exception(self, engine: Engine, error: BaseException) -> None:
        self._finish(engine)

    # -- state -----------------------------------------------------------------
    @property
    def codes(self) -> list[str]:
        """The codes of the findings so far, in the order found."""
        return [finding.code for finding in self.findings]

    def state_dict(self) -> dict[str, Any]:
        return {"findings": [finding.to_dict() for finding in self.findings]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        check_state_keys(type(self).__name__, self.state_keys, state_dict)
        self.findings[:] = [Finding.from_dict(entry) for entry in state_dict["findings"]]


_ENCODE = json.JSONEncoder(default=str).encode  # no indent: json's C encoder


def doctor_json(findings: list[dict[str, Any]], context: Mapping[str, Any]) -> str:
    """``doctor.json``'s text: one line per finding and per context entry.

    Each line is encoded by json's C encoder (an indented dump runs its pure
    Python one), and the file is still readable line by line.

    >>> text = doctor_json([{"code": "all-frozen", "step": 0}], {"planned_steps": 3, "val_history": []})
    >>> print(text, end="")
    {
      "findings": [
        {"code": "all-frozen", "step": 0}
      ],
      "context": {
        "planned_steps": 3,
        "val_history": []
      }
    }
    >>> json.loads(text) == {"findings": [{"code": "all-frozen", "step": 0}], "context": {"planned_steps": 3, "val_history": []}}
    True
    >>> json.loads(doctor_json([], {}))
    {'findings': [], 'context': {}}
    """
    rows = ",\n".join(f"    {_ENCODE(finding)}" for finding in findings)
    entries = ",\n".join(f"    {_ENCODE(str(key))}: {_ENCODE(value)}" for key, value in context.items())
    findings_text = f"[\n{rows}\n  ]" if rows else "[]"
    context_text = f"{{\n{entries}\n  }}" if entries else "{}"
    return f'{{\n  "findings": {findings_text},\n  "context": {context_text}\n}}\n'
