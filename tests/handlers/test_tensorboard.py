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
    """Every Event in the directory's event files, oldest file first."""
    return [event for path in sorted(Path(log_dir).glob("events.out.tfevents.*")) for event in read_file(path)]


def read_file(path) -> list:
    """The Events of one event file (TFRecord: length, crc, data, crc), in file order."""
    events, data, pos = [], Path(path).read_bytes(), 0
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


def records(log_dir) -> list[tuple[bytes, int, bytes, int]]:
    """Every TFRecord as (length field, its stored CRC, data, its stored CRC)."""
    found = []
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            body = data[pos + 12 : pos + 12 + length]
            (body_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
            found.append((header, header_crc, body, body_crc))
            pos += 16 + length
    return found


def test_every_step_of_every_tag_is_in_valid_records_one_event_per_step(tmp_path):
    from tensorboardX.record_writer import masked_crc32c

    from handlers.grad_norm import GradNormLogger

    _, _, trainer = make(accumulation=1)
    truth = {"loss": [], "norm": []}

    def record(e):
        truth["loss"].append(e.state.output.loss.item())
        truth["norm"].append(e.state.output.grad_norm.item())

    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, record)
    tb = TensorBoardLogger(log_dir=tmp_path, log_every=7)
    tb.attach(trainer)
    GradNormLogger(flush_every=5, writer=tb.writer, bins=4).attach(trainer)
    trainer.run(regression_batches(92, 4), max_epochs=2)  # 23 steps per epoch: flushes mid-epoch and at its end

    steps = list(range(1, 47))
    found = scalars(tmp_path)
    assert [s for s, _ in found["train/loss"]] == steps
    assert [v for _, v in found["train/loss"]] == pytest.approx(truth["loss"], rel=1e-6)
    assert found["lr/group0"] == [(s, pytest.approx(0.1)) for s in steps]
    assert found["lr/group1"] == [(s, pytest.approx(0.01)) for s in steps]
    assert [s for s, _ in found["grad_norm/pre_clip"]] == steps
    assert [v for _, v in found["grad_norm/pre_clip"]] == pytest.approx(truth["norm"], rel=1e-6)
    # One event per step holds the step's loss and learning rates together.
    per_step = [[v.tag for v in e.summary.value] for e in read_events(tmp_path) if "train/loss" in
                [v.tag for v in e.summary.value]]
    assert per_step == [["train/loss", "lr/group0", "lr/group1"]] * len(steps)
    histograms = [e for e in read_events(tmp_path) for v in e.summary.value if v.tag == "grad_norm/histogram"]
    assert [e.step for e in histograms] == [5, 10, 15, 20, 23, 28, 33, 38, 43, 46]
    assert sum(v.histo.num for e in histograms for v in e.summary.value) == 46
    # Every record TensorBoard reads checks out: the CRCs written without tensorboardX's loop are right.
    written = records(tmp_path)
    assert len(written) == len(read_events(tmp_path)) > 46
    for header, header_crc, body, body_crc in written:
        assert (header_crc, body_crc) == (masked_crc32c(header), masked_crc32c(body))
    assert all(e.wall_time > 0 for e in read_events(tmp_path))


def test_scalar_events_are_what_protobuf_writes():
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.summary import _clean_tag

    from handlers.event_encoding import scalar_event

    cases = [
        (0, 0.0, [("a", 0.0)]),
        (1, 1.7e9, [("train/loss", 0.5), ("lr/group0", 1e-3), ("lr/group1", 3)]),
        (127, 12.5, [("x", float("nan")), ("y", float("inf")), ("z", -float("inf"))]),
        (128, 3.25, [("big", 1e39), ("small", -1e39), ("tiny", 1e-50)]),
        (2**40, 1.0, [("val/top 1 (%)", 7.0), ("/leading", 1.0), ("ünï", 2.0), ("t" * 200, 0.25)]),
        (-3, 2.0, [("negative/step", 1.0)]),
    ]
    for step, wall_time, values in cases:
        summary = Summary(value=[Summary.Value(tag=_clean_tag(tag), simple_value=value) for tag, value in values])
        expected = Event(step=step, wall_time=wall_time, summary=summary).SerializeToString()
        assert scalar_event(step, wall_time, values) == expected


def test_batched_crcs_match_tensorboardx():
    import random

    from tensorboardX.record_writer import masked_crc32c as one

    from handlers.event_file import masked_crc32c

    rng = random.Random(0)
    for lengths in ([1], [8, 8, 8], [rng.randrange(1, 300) for _ in range(60)], [5000, 3]):
        chunks = [bytes(rng.randrange(256) for _ in range(n)) for n in lengths]
        assert masked_crc32c(chunks) == [one(chunk) for chunk in chunks]
    assert masked_crc32c([b"", b"ab"]) == [one(b""), one(b"ab")]
    assert masked_crc32c([]) == []


def test_resumed_file_starts_with_the_purge_marker_before_any_scalar(tmp_path):
    _, _, trainer = make(accumulation=1)
    tb = TensorBoardLogger(log_dir=tmp_path, log_every=2)
    tb.attach(trainer)
    trainer.run(regression_batches(16, 4), max_epochs=1)  # steps 1..4, then closed
    tb.load_state_dict({"last_step": 2})  # as a resume from a checkpoint at step 2 would
    trainer.run(regression_batches(16, 4), max_epochs=2)  # extend: steps 5..8 in the new file
    files = sorted(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 2
    events = read_file(files[-1])
    kinds = ["marker" if e.HasField("session_log") else "scalar" if e.HasField("summary") else "other" for e in events]
    assert kinds.index("marker") < kinds.index("scalar")  # TensorBoard purges what precedes the marker
    assert [e.step for e in events if e.HasField("session_log")] == [3]
    assert [e.step for e in events if e.HasField("summary")] == [5, 6, 7, 8]


class ScalarWriter:
    """A writer that is not a tensorboardX SummaryWriter: gets one add_scalar per value."""

    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        pass


def test_any_writer_with_add_scalar_gets_every_value():
    _, _, trainer = make(accumulation=2)
    writer = ScalarWriter()
    TensorBoardLogger(writer=writer, log_every=2).attach(trainer)
    trainer.run(regression_batches(24, 4), max_epochs=1)  # 6 batches: 3 steps
    assert [(tag, step) for tag, _, step in writer.calls] == [
        (tag, step) for step in (1, 2, 3) for tag in ("train/loss", "lr/group0", "lr/group1")
    ]


def test_a_scheduler_attached_first_still_logs_the_rate_each_step_used(tmp_path):
    # Handlers already on the step event: the window reads the rates on GRADIENTS_READY instead.
    model, opt, trainer = make(accumulation=1)
    halve = lambda: opt.param_groups[1].update(lr=opt.param_groups[1]["lr"] / 2)  # noqa: E731
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, halve)
    tb = TensorBoardLogger(log_dir=tmp_path, log_every=3)
    tb.attach(trainer)
    trainer.run(regression_batches(16, 4), max_epochs=1)
    assert scalars(tmp_path)["lr/group1"] == [(s, pytest.approx(0.01 / 2 ** (s - 1))) for s in range(1, 5)]
