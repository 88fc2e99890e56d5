"""Where findings go (log line, doctor.json, TensorBoard text, engine-kit doctor) and what a clean run costs."""

from __future__ import annotations

import json
import logging

import torch
import torch.nn.functional as F
from ignite.engine import Events
from ignite.metrics import Accuracy

from engine_kit import StepEvents, create_evaluator, create_trainer
from engine_kit.cli import main as cli_main
from engine_kit.doctor import diagnose_run
from engine_kit.doctor.run_dir import main as doctor_main
from handlers import attach_standard
from tests.doctor.plant import learnable_batches
from tests.handlers.test_tensorboard import read_events
from tests.helpers import mlp


def _standard_run(run_dir, optimizer, n_batches: int, epochs: int = 1, **trainer_options):
    model = mlp()
    trainer = create_trainer(model, optimizer(model), F.cross_entropy, **trainer_options)
    evaluator = create_evaluator(model, metrics={"accuracy": Accuracy()})
    stack = attach_standard(trainer, evaluator, learnable_batches(2, seed=9), run_dir=run_dir, log_every=5,
                            checkpoint_every_steps=None)
    trainer.run(learnable_batches(n_batches), max_epochs=epochs)
    return trainer, stack


def test_a_finding_reaches_the_log_the_file_tensorboard_and_the_command(tmp_path, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="engine_kit.doctor"):
        _, stack = _standard_run(tmp_path, lambda m: torch.optim.Adam(m.parameters(), lr=0.01), 40,
                                 max_grad_norm=0.01)
    (finding,) = stack.doctor.findings
    assert finding.code == "clipping-share"
    assert [r.getMessage() for r in caplog.records if r.name == "engine_kit.doctor"] == [finding.line()]
    assert "\n" not in finding.line()
    recorded = json.loads((tmp_path / "doctor.json").read_text())
    assert recorded["findings"] == [finding.to_dict()] and recorded["context"]["max_grad_norm"] == 0.01
    texts = [value.tag for event in read_events(tmp_path / "tb") for value in event.summary.value
             if value.tag.startswith("doctor/")]
    assert texts == ["doctor/clipping-share/text_summary"]
    assert cli_main(["doctor", str(tmp_path)]) == 1
    assert capsys.readouterr().out.strip() == finding.line()
    # From the step log alone (no doctor.json): the same finding, judged again.
    (tmp_path / "doctor.json").unlink()
    assert [f.code for f in diagnose_run(tmp_path)] == ["clipping-share"]


def _doctor_handlers(trainer, doctor) -> dict[str, int]:
    owners = (doctor, doctor._rows)
    counts = {}
    for event, entries in trainer._event_handlers.items():
        for func, _, _ in entries:
            while hasattr(func, "__wrapped__") and getattr(func, "__self__", None) is None:
                func = func.__wrapped__
            if getattr(func, "__self__", None) in owners:
                counts[getattr(event, "name", str(event))] = counts.get(getattr(event, "name", str(event)), 0) + 1
    return counts


def test_a_clean_run_has_no_finding_and_no_per_iteration_doctor_work(tmp_path, capsys):
    trainer, stack = _standard_run(tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.5), 45, epochs=2)
    assert stack.doctor.findings == [] and trainer.state.doctor_findings == []
    attached = _doctor_handlers(trainer, stack.doctor)
    per_iteration = {Events.GET_BATCH_STARTED, Events.GET_BATCH_COMPLETED, Events.ITERATION_STARTED,
                     Events.ITERATION_COMPLETED, StepEvents.GRADIENTS_READY, StepEvents.OPTIMIZER_STEP_COMPLETED,
                     StepEvents.BACKWARD_COMPLETED}
    assert not set(attached) & {event.name for event in per_iteration}, attached
    assert trainer.step.loss_fn is F.cross_entropy
    assert doctor_main(str(tmp_path)) == 0
    assert capsys.readouterr().out.strip() == "doctor: no findings."


def test_without_a_step_log_the_doctor_keeps_step_values_itself():
    model = mlp()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), F.cross_entropy)
    from handlers import Doctor
    doctor = Doctor()
    doctor.attach(trainer)
    trainer.run(learnable_batches(12), max_epochs=1)
    assert doctor.codes == ["loss-not-falling"]
    assert "record" in doctor._handles  # the one per-step handler, only without a StepLog


def test_doctor_command_on_a_missing_directory(tmp_path, capsys):
    assert doctor_main(str(tmp_path / "nowhere")) == 2
    assert "To fix" in capsys.readouterr().out


def test_with_grad_norm_logger_only_the_first_rows_of_the_step_log_are_parsed(tmp_path):
    _, stack = _standard_run(tmp_path, lambda m: torch.optim.Adam(m.parameters(), lr=0.01), 90,
                             max_grad_norm=0.01)
    assert stack.doctor.codes == ["clipping-share"]
    assert "(72 of 72; steady state taken as steps 19-90" in stack.doctor.findings[0].evidence
    assert len(stack.doctor._rows._rows) == 50  # the loss window; the norms came from GradNormLogger
    # doctor.json is rewritten only when its text changes (or its path does).
    path = tmp_path / "doctor.json"
    inode, text = path.stat().st_ino, path.read_text()
    stack.doctor._write()
    assert path.stat().st_ino == inode and path.read_text() == text
    stack.doctor.path = str(tmp_path / "moved.json")
    stack.doctor._write()
    assert (tmp_path / "moved.json").read_text() == text


def test_texts_are_written_as_add_text_writes_them(tmp_path):
    from tensorboardX import SummaryWriter

    from handlers.event_file import write_texts

    direct, queued = SummaryWriter(str(tmp_path / "direct")), SummaryWriter(str(tmp_path / "queued"))
    rows = [(0, "doctor/weight-decay-on-norms", "doctor [weight-decay-on-norms]: a line."), (40, "doctor/eval-mode", "b")]
    write_texts(direct, rows)
    for step, tag, text in rows:
        queued.add_text(tag, text, step)
    direct.close(), queued.close()
    written = [event for event in read_events(tmp_path / "direct") if event.HasField("summary")]
    expected = [event for event in read_events(tmp_path / "queued") if event.HasField("summary")]
    assert [(e.step, e.summary) for e in written] == [(e.step, e.summary) for e in expected] and len(written) == 2
