"""TensorBoardLogger: the event files hold the expected tags and values, written in batches."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from ignite.metrics import MeanSquaredError
from tensorboardX.proto import event_pb2

import engine_kit.trainer as trainer_module
from engine_kit import StepEvents, create_evaluator, create_trainer
from engine_kit.precision import Precision
from handlers.tensorboard import TensorBoardLogger
from handlers.validation import Validation
from tests.helpers import mlp, regression_batches


def read_events(log_dir) -> list:
    """Every Event in the directory's event files (TFRecord: length, crc, data, crc), oldest file first."""
    events = []
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])
            events.append(event)
            pos += 12 + length + 4
    return events


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list[tuple[int, float]]] = {}
    for event in read_events(log_dir):
        for value in event.summary.value:
            found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def make(accumulation: int = 2):
    model = mlp(in_features=2, out=1)
    body, head = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = torch.optim.SGD([{"params": body, "lr": 0.1}, {"params": head, "lr": 0.01}])
    trainer = create_trainer(model, opt, F.mse_loss, accumulation_steps=accumulation)
    return model, opt, trainer


def test_event_file_holds_loss_lr_and_validation(tmp_path):
    model, opt, trainer = make()
    # A scheduler-like decay that runs before the logger: the logged rate must be the one each step used.
    halve = lambda: opt.param_groups[0].update(lr=opt.param_groups[0]["lr"] / 2)  # noqa: E731
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, halve)
    evaluator = create_evaluator(model, metrics={"mse": MeanSquaredError()})
    Validation(evaluator, regression_batches(8, 4, seed=9)).attach(trainer)
    micro, windows = {}, []

    def micro_batch(e):
        micro[e.state.iteration] = (e.state.output.loss.item(), e.state.output.num_samples)

    trainer.add_event_handler(Events.ITERATION_COMPLETED, micro_batch)
    trainer.add_event_handler(
        StepEvents.OPTIMIZER_STEP_COMPLETED, lambda e: windows.append((e.state.optimizer_steps, e.state.iteration))
    )
    tb = TensorBoardLogger(log_dir=tmp_path, log_every=3)
    tb.attach(trainer)
    state = trainer.run(regression_batches(38, 4), max_epochs=2)  # 10 batches (last of 2 samples), acc 2

    found = scalars(tmp_path)
    expected_loss, previous = [], 0
    for step, iteration in windows:
        batch = [micro[i] for i in range(previous + 1, iteration + 1)]
        previous = iteration
        expected_loss.append((step, sum(loss * n for loss, n in batch) / sum(n for _, n in batch)))
    assert [s for s, _ in found["train/loss"]] == list(range(1, 11))
    assert [v for _, v in found["train/loss"]] == pytest.approx([v for _, v in expected_loss], rel=1e-6)
    assert found["lr/group0"] == [(s, pytest.approx(0.1 / 2 ** (s - 1))) for s in range(1, 11)]
    assert found["lr/group1"] == [(s, pytest.approx(0.01)) for s in range(1, 11)]
    assert found["val/mse"] == [(v["optimizer_steps"], pytest.approx(v["mse"])) for v in state.val_history]
    assert [s for s, _ in found["val/mse"]] == [5, 10]
    assert "train/skipped_steps" not in found
    # Batched: steps 1-3, 4-5 (epoch end), 6-8, 9-10 (epoch end).
    assert tb.flushes == 4 and tb.last_step == 10


def test_skipped_steps_are_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "resolve_precision", lambda precision, device: Precision("fp16", "cpu"))
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, precision="fp16")
    TensorBoardLogger(log_dir=tmp_path).attach(trainer)
    x, y = regression_batches(4, 4)[0]
    trainer.run([(x, torch.full_like(y, float("inf"))), (x, y)], max_epochs=1)
    found = scalars(tmp_path)
    assert found["train/skipped_steps"] == [(0, 1.0)]
    assert [s for s, _ in found["train/loss"]] == [1]  # the skipped window plots no loss


def test_shared_writer_and_a_second_run_keep_every_file(tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir=str(tmp_path))
    tb = TensorBoardLogger(writer=writer, log_every=100)
    assert tb.writer is writer
    _, _, trainer = make(accumulation=1)
    tb.attach(trainer)
    trainer.run(regression_batches(8, 4), max_epochs=1)
    writer.add_scalar("other/after_close", 1.0, 2)  # a sharing handler writing after the logger closed
    trainer.run(regression_batches(8, 4), max_epochs=2)  # extend training: steps 3, 4
    tb.close()
    found = scalars(tmp_path)
    assert [s for s, _ in found["train/loss"]] == [1, 2, 3, 4]
    assert found["other/after_close"] == [(2, 1.0)]


def test_a_writer_shared_with_a_handler_attached_later_is_closed_after_it(tmp_path):
    from handlers.grad_norm import GradNormLogger

    _, _, trainer = make(accumulation=1)
    tb = TensorBoardLogger(log_dir=tmp_path, log_every=100)
    tb.attach(trainer)
    GradNormLogger(flush_every=100, writer=tb.writer).attach(trainer)  # flushes on COMPLETED, after tb's attach
    # Stopped mid-epoch: no EPOCH_COMPLETED flush, so the norms reach the writer only on COMPLETED.
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED(once=3), lambda e: e.terminate())
    trainer.run(regression_batches(16, 4), max_epochs=1)
    found = scalars(tmp_path)
    assert [s for s, _ in found["grad_norm/pre_clip"]] == [1, 2, 3]
    assert [s for s, _ in found["train/loss"]] == [1, 2, 3]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1  # nothing written to a reopened file


def test_resume_marks_stale_steps_for_purging_and_never_rewrites(tmp_path):
    _, _, trainer = make(accumulation=1)
    tb = TensorBoardLogger(log_dir=tmp_path, log_every=100)
    tb.attach(trainer)
    saved = []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED(once=3), lambda: saved.append(tb.state_dict()))
    trainer.run(regression_batches(24, 4), max_epochs=1)  # the "killed" run wrote steps 1..6
    assert saved == [{"last_step": 3}]
    resumed = TensorBoardLogger(log_dir=tmp_path)
    resumed.load_state_dict(saved[0])
    resumed.writer.close()
    starts = [e.step for e in read_events(tmp_path) if e.HasField("session_log") and e.session_log.status == 1]
    assert starts == [4]  # TensorBoard drops the old steps >= 4 when it reads this marker
    with pytest.raises(ValueError, match="missing keys \\['last_step'\\].*To fix"):
        resumed.load_state_dict({})


def test_bad_options_and_attach_checks(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        TensorBoardLogger(log_dir=tmp_path, writer=object())
    with pytest.raises(TypeError, match="without add_scalar"):
        TensorBoardLogger(writer=object())
    with pytest.raises(ValueError, match="log_every=0 is below 1"):
        TensorBoardLogger(log_every=0)
    tb = TensorBoardLogger()  # builds nothing on disk until the writer is used
    assert tb._writer is None and tb.state_dict() == {"last_step": 0}
    model, _, trainer = make()
    tb = TensorBoardLogger(log_dir=tmp_path)
    with pytest.raises(RuntimeError, match="is it an evaluator"):
        tb.attach(create_evaluator(model))
    tb.attach(trainer)
    with pytest.raises(RuntimeError, match="already attached"):
        tb.attach(trainer)
