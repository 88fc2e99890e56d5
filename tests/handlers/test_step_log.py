"""StepLog: one row per optimizer step with the step's true values, batched writes, CSV, resume."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

import engine_kit.trainer as trainer_module
from engine_kit import StepEvents, create_evaluator, create_trainer
from engine_kit.precision import Precision
from engine_kit.training_state import capture_training_state, restore_training_state
from handlers.step_log import _ROW, FIELDS, StepLog, _json_number, read_step_log, to_csv
from handlers.step_window import StepWindow, Window, read_windows
from handlers.tensorboard import TensorBoardLogger
from tests.handlers.test_tensorboard import scalars  # imports tensorboardX, which sets CRC32C_SW_MODE
from tests.helpers import mlp, regression_batches


def make(accumulation: int = 2, max_grad_norm: float | None = 1.5):
    model = mlp(in_features=2, out=1)
    body, head = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = torch.optim.SGD([{"params": body, "lr": 0.1}, {"params": head, "lr": 0.01}])
    trainer = create_trainer(model, opt, F.mse_loss, accumulation_steps=accumulation, max_grad_norm=max_grad_norm)
    return model, opt, trainer


def decay_lr_on_step(trainer, opt):
    # Attached before the log: the row must still show the rate its step used.
    def decay():
        opt.param_groups[0]["lr"] *= 0.5

    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, decay)


def record_truth(trainer):
    """What the step really did, read with .item() (fine in a test)."""
    truth = {"micro": {}, "steps": [], "lrs": []}

    def micro_batch(e):
        truth["micro"][e.state.iteration] = (e.state.output.loss.item(), e.state.output.num_samples)

    trainer.add_event_handler(Events.ITERATION_COMPLETED, micro_batch)
    trainer.add_event_handler(
        StepEvents.GRADIENTS_READY, lambda e: truth["lrs"].append([g["lr"] for g in e.step.optimizer.param_groups])
    )
    trainer.add_event_handler(
        StepEvents.OPTIMIZER_STEP_COMPLETED,
        lambda e: truth["steps"].append(
            (e.state.optimizer_steps, e.state.epoch, e.state.iteration, e.state.output.grad_norm.item())
        ),
    )
    return truth


def test_one_row_per_step_with_the_step_values(tmp_path):
    path = tmp_path / "steps.jsonl"
    _, opt, trainer = make()
    decay_lr_on_step(trainer, opt)
    log = StepLog(path, flush_every=3)
    log.attach(trainer)
    truth = record_truth(trainer)
    batches = regression_batches(38, 4)  # 10 batches, the last of 2 samples: windows 2,2,2,2,2 per epoch
    trainer.run(batches, max_epochs=2)
    rows = read_step_log(path)
    assert len(rows) == trainer.state.optimizer_steps == 10
    previous_iteration = 0
    for row, (step, epoch, iteration, norm), lrs in zip(rows, truth["steps"], truth["lrs"]):
        assert list(row) == [*FIELDS, "lrs"]
        assert (row["step"], row["epoch"], row["iteration"]) == (step, epoch, iteration)
        window = [truth["micro"][i] for i in range(previous_iteration + 1, iteration + 1)]
        previous_iteration = iteration
        expected_loss = sum(loss * n for loss, n in window) / sum(n for _, n in window)
        assert row["loss"] == pytest.approx(expected_loss, rel=1e-6)
        assert row["grad_norm"] == pytest.approx(norm, rel=1e-6)
        assert row["clipped"] is (norm > 1.5)
        assert row["lr"] == pytest.approx(lrs[0]) and row["lrs"] == pytest.approx(lrs)
        assert row["skipped"] is False
        assert row["samples_per_s"] > 0 and row["time"] > 0
    assert rows[4]["iteration"] == 10 and rows[4]["lr"] == pytest.approx(0.1 * 0.5**4)
    assert any(r["clipped"] for r in rows) and not all(r["clipped"] for r in rows)
    # Written in batches: steps 1-3, 4-5 (epoch end), 6-8, 9-10 (epoch end).
    assert log.writes == 4


def test_nothing_is_written_before_a_flush(tmp_path):
    path = tmp_path / "steps.jsonl"
    _, _, trainer = make(accumulation=1, max_grad_norm=None)
    StepLog(path, flush_every=3).attach(trainer)
    sizes = []
    size = lambda: path.stat().st_size if path.exists() else 0  # noqa: E731
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda: sizes.append(size()))
    trainer.run(regression_batches(16, 2), max_epochs=1)  # 8 steps
    assert sizes[0] == sizes[1] == 0 and sizes[2] > 0 and sizes[2] == sizes[4] < sizes[5]
    rows = read_step_log(path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["clipped"] is False and "lrs" in r for r in rows)


def test_csv_export_has_the_same_rows(tmp_path):
    path, csv_path = tmp_path / "steps.jsonl", tmp_path / "steps.csv"
    _, _, trainer = make()
    StepLog(path, flush_every=4).attach(trainer)
    trainer.run(regression_batches(16, 4), max_epochs=2)
    rows = read_step_log(path)
    assert to_csv(path, csv_path) == len(rows) == 4
    with open(csv_path, newline="") as f:
        exported = list(csv.DictReader(f))
    assert len(exported) == len(rows)
    for row, line in zip(rows, exported):
        assert list(line) == list(row)
        for key, value in row.items():
            if isinstance(value, list):
                assert json.loads(line[key]) == value
            elif isinstance(value, float):
                assert float(line[key]) == value
            else:
                assert line[key] == str(value)


def test_skipped_step_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "resolve_precision", lambda precision, device: Precision("fp16", "cpu"))
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, precision="fp16",
                             max_grad_norm=1.0)
    path = tmp_path / "steps.jsonl"
    StepLog(path).attach(trainer)
    x, y = regression_batches(4, 4)[0]
    trainer.run([(x, torch.full_like(y, float("inf"))), (x, y)], max_epochs=1)
    rows = read_step_log(path)
    assert [(r["step"], r["iteration"], r["skipped"]) for r in rows] == [(0, 1, True), (1, 2, False)]
    assert not math.isfinite(rows[0]["grad_norm"]) and rows[0]["clipped"] is False
    assert "lrs" not in rows[0]


def run_with_checkpoint(path, batches, max_epochs, payloads=None, restore=None):
    model, _, trainer = make()
    log = StepLog(path, flush_every=100)
    log.attach(trainer)
    if payloads is not None:  # a copy of the state at the end of epoch 1, as a checkpoint file would hold
        keep = lambda e: payloads.append(copy.deepcopy(capture_training_state(e)))  # noqa: E731
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), keep)
    if restore is not None:
        trainer.add_event_handler(Events.STARTED, lambda e: restore_training_state(e, restore))
    trainer.run(batches, max_epochs=max_epochs)
    return log


def test_resume_truncates_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text('{"step": 7, "note": "an earlier run in the same file"}\n')
    batches = regression_batches(16, 4)  # 2 steps per epoch
    payloads = []
    run_with_checkpoint(path, batches, 3, payloads=payloads)  # the "killed" run wrote steps 1..6
    crashed = read_step_log(path)
    assert [r["step"] for r in crashed] == [7, 1, 2, 3, 4, 5, 6]
    assert payloads[0]["stateful"]["step_log"]["step"] == 2
    run_with_checkpoint(path, batches, 3, restore=payloads[0])
    resumed = read_step_log(path)
    assert [r["step"] for r in resumed] == [7, 1, 2, 3, 4, 5, 6]  # no duplicate, no gap
    assert resumed[:3] == crashed[:3]
    for again, before in zip(resumed[3:], crashed[3:]):  # same model state, same data: same losses
        assert again["loss"] == pytest.approx(before["loss"], rel=1e-6)
        assert again["time"] > before["time"]


def test_a_foreign_file_is_not_truncated(tmp_path):
    path = tmp_path / "steps.jsonl"
    log = StepLog(path)
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    with pytest.warns(UserWarning, match="was not truncated"):
        log.load_state_dict({"step": 5, "offset": 12})
    assert len(read_step_log(path)) == 3
    with pytest.warns(UserWarning, match="fewer than"):
        log.load_state_dict({"step": 9, "offset": 10_000})
    log.load_state_dict({"step": 1, "offset": 12})
    assert read_step_log(path) == [{"step": 1}]
    log.load_state_dict({"step": 0, "offset": 0})  # saved before this run wrote a row: all is the crashed run's
    assert path.read_text() == ""
    with pytest.raises(ValueError, match="missing keys \\['offset'\\].*To fix"):
        log.load_state_dict({"step": 1})


def test_torn_line_is_skipped_and_never_glued(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="not a JSON line"):
        assert read_step_log(path) == [{"step": 1}]
    _, _, trainer = make()
    StepLog(path).attach(trainer)
    trainer.run(regression_batches(8, 4), max_epochs=1)
    with pytest.warns(UserWarning, match="not a JSON line"):
        rows = read_step_log(path)
    assert [r["step"] for r in rows] == [1, 1]


def test_bad_options_and_attach_checks(tmp_path):
    with pytest.raises(ValueError, match="flush_every=0 is below 1"):
        StepLog(tmp_path / "a.jsonl", flush_every=0)
    with pytest.raises(ValueError, match="does not exist.*To fix: create it first"):
        StepLog(tmp_path / "missing" / "a.jsonl")
    with pytest.raises(TypeError, match="is not a path"):
        StepLog(3)
    model, _, trainer = make()
    log = StepLog(tmp_path / "a.jsonl")
    with pytest.raises(RuntimeError, match="is it an evaluator"):
        log.attach(create_evaluator(model))
    log.attach(trainer)
    with pytest.raises(RuntimeError, match="already attached"):
        log.attach(trainer)
    assert log.state_dict() == {"step": 0, "offset": 0}


def test_lines_are_exactly_what_json_dumps_writes():
    cases = [
        (1, 1, 1, 0.5, 0.1, 1.25, True, False, 1234.5, 1.7e9, [0.1]),
        (2, 1, 4, float("nan"), None, None, False, True, None, 1.7e9 + 0.123456, [0.1, 3e-05]),
        (0, 3, 9, float("inf"), 1e-300, -float("inf"), False, False, 7, 0.0, []),
    ]
    for step, epoch, iteration, loss, lr, norm, clipped, skipped, rate, wall, lrs in cases:
        record = {"step": step, "epoch": epoch, "iteration": iteration, "loss": loss, "lr": lr, "grad_norm": norm,
                  "clipped": clipped, "skipped": skipped, "samples_per_s": rate, "time": wall}
        line = _ROW % (step, epoch, iteration, _json_number(loss), _json_number(lr), _json_number(norm),
                       "true" if clipped else "false", "true" if skipped else "false", _json_number(rate),
                       _json_number(wall))
        if len(lrs) > 1:
            record["lrs"] = lrs
            line += ', "lrs": [' + ", ".join(map(_json_number, lrs)) + "]"
        assert line + "}" == json.dumps(record)


def test_a_step_without_a_norm_logs_null(tmp_path):
    path = tmp_path / "steps.jsonl"
    _, _, trainer = make(accumulation=1, max_grad_norm=None)
    StepLog(path, flush_every=2).attach(trainer)
    assert trainer.step.track_grad_norm is True  # attaching asks the step for the norm
    trainer.step.track_grad_norm = False  # a step that hands out none anyway
    trainer.run(regression_batches(12, 4), max_epochs=1)
    rows = read_step_log(path)
    assert [(r["step"], r["grad_norm"], r["clipped"]) for r in rows] == [(1, None, False), (2, None, False),
                                                                         (3, None, False)]
    assert all(isinstance(r["loss"], float) for r in rows)


def test_token_counts_as_tensors_weight_the_window_loss(tmp_path):
    path = tmp_path / "steps.jsonl"
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, accumulation_steps=3,
                             batch_size_fn=lambda x, y: torch.tensor(len(y)))
    StepLog(path, flush_every=2).attach(trainer)
    truth = record_truth(trainer)
    trainer.run(regression_batches(30, 4), max_epochs=1)  # 8 batches (the last of 2): windows of 3, 3, 2
    rows = read_step_log(path)
    previous = 0
    for row, (step, _, iteration, norm) in zip(rows, truth["steps"], strict=True):
        window = [truth["micro"][i] for i in range(previous + 1, iteration + 1)]
        previous = iteration
        total = sum(float(n) for _, n in window)
        assert row["loss"] == pytest.approx(sum(loss * float(n) for loss, n in window) / total, rel=1e-6)
        assert row["grad_norm"] == pytest.approx(norm, rel=1e-6)
    assert [r["iteration"] for r in rows] == [3, 6, 8]


def test_tensorboard_and_step_log_share_one_window(tmp_path):
    _, opt, trainer = make(accumulation=2)
    decay_lr_on_step(trainer, opt)  # attached first: the window reads the rates on GRADIENTS_READY
    log = StepLog(tmp_path / "steps.jsonl", flush_every=3)
    log.attach(trainer)
    tb = TensorBoardLogger(log_dir=tmp_path / "tb", log_every=4)
    tb.attach(trainer)
    assert log._window is tb._window is StepWindow.of(trainer)
    truth = record_truth(trainer)
    trainer.run(regression_batches(38, 4), max_epochs=1)
    rows = read_step_log(tmp_path / "steps.jsonl")
    found = scalars(tmp_path / "tb")
    assert [(r["step"], r["loss"]) for r in rows] == [(s, pytest.approx(v, rel=1e-6)) for s, v in found["train/loss"]]
    assert [r["lr"] for r in rows] == pytest.approx([lrs[0] for lrs in truth["lrs"]])
    assert [v for _, v in found["lr/group0"]] == pytest.approx([lrs[0] for lrs in truth["lrs"]])


def test_samples_per_s_is_timed_from_step_to_step_and_unknown_after_an_interrupt(tmp_path) -> None:
    _, _, trainer = make(accumulation=1)
    path = tmp_path / "steps.jsonl"
    StepLog(path, flush_every=1).attach(trainer)
    batches = regression_batches(24, batch_size=4)
    pause_s = 0.05

    # Work done between two steps (here a slow handler after step 2) belongs to the next window.
    @trainer.on(Events.ITERATION_COMPLETED(once=2))
    def slow_handler() -> None:
        import time

        time.sleep(pause_s)

    @trainer.on(Events.ITERATION_COMPLETED(once=4))
    def pause_the_run() -> None:
        trainer.interrupt()

    trainer.run(batches, max_epochs=1)
    trainer.run(batches, max_epochs=1)  # resumes after the interrupt
    rows = read_step_log(path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[2]["samples_per_s"] <= 4 / pause_s  # window 3 includes the slow handler
    assert rows[4]["samples_per_s"] is None  # the first window after interrupt(): no start to time from
    assert all(rows[i]["samples_per_s"] > 4 / pause_s for i in (0, 1, 3, 5))


def test_read_windows_common_case_equals_the_general_path() -> None:
    """Scalar losses with int counts take a shortcut; mixed values (tensor counts) take the general path."""
    gen = torch.Generator().manual_seed(3)

    def windows(count_kind):
        made = []
        for size in (1, 3, 4, 2):
            parts = tuple((torch.rand((), generator=gen), count_kind(int(n)))
                          for n in torch.randint(1, 9, (size,), generator=gen))
            norm = torch.rand((), generator=gen) if size != 3 else None  # a step without a norm too
            made.append(Window(parts, [0.1, 0.01], norm))
        return made

    common = windows(int)
    gen.manual_seed(3)
    general = windows(torch.tensor)  # same values, tensor counts: the general path
    norms = [torch.tensor(2.5), None, torch.tensor(float("nan"))]
    fast_extra, general_extra = read_windows(common, norms), read_windows(general, norms)
    assert fast_extra[:2] == general_extra[:2] == [2.5, None] and math.isnan(fast_extra[2]) and math.isnan(general_extra[2])
    for a, b in zip(common, general):
        assert a.values == b.values and a.norm_value == b.norm_value  # the same floats, bit for bit
    assert [w.norm_value is None for w in common] == [False, True, False, False]
