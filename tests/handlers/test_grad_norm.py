"""GradNormLogger: hand-checked pre-clip norms, clipping counts, writer tags, amortized syncs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from tensorboardX import SummaryWriter  # at import: tensorboardX sets CRC32C_SW_MODE when first imported

import engine_kit.trainer as trainer_module
from engine_kit import StepEvents, create_evaluator, create_trainer
from engine_kit.precision import Precision
from engine_kit.stateful import stateful_objects
from handlers.grad_norm import GradNormLogger
from tests.helpers import mlp, noop_engine, regression_batches

MAX_NORM = 1.0  # with this data, some steps clip and some do not (asserted below)


def hand_loop_norms(batches, accumulation, epochs=2, max_norm=MAX_NORM):
    """A plain PyTorch loop: mean loss over each window, clip, step; returns pre-clip norms."""
    model = mlp(in_features=2, out=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    for _ in range(epochs):
        for start in range(0, len(batches), accumulation):
            window = batches[start : start + accumulation]  # equal batches: mean = sum / len
            for x, y in window:
                (F.mse_loss(model(x), y) / len(window)).backward()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
            opt.step()
            opt.zero_grad(set_to_none=True)
    return norms


def make_trainer(accumulation=1, max_norm=MAX_NORM):
    model = mlp(in_features=2, out=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return create_trainer(model, opt, F.mse_loss, accumulation_steps=accumulation, max_grad_norm=max_norm)


class FakeWriter:
    def __init__(self):
        self.scalars = []
        self.histograms = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_histogram(self, tag, values, step, bins="tensorflow"):
        self.histograms.append((tag, values.tolist(), step, bins))


@pytest.mark.parametrize("accumulation", [1, 4])
def test_norms_and_clipped_fraction_match_a_hand_loop(accumulation):
    batches = regression_batches(40, 4)  # 10 batches: windows of 4, 4, 2 under accumulation 4
    expected = hand_loop_norms(batches, accumulation)
    clipped = sum(n > MAX_NORM for n in expected)
    assert 0 < clipped < len(expected)  # the data exercises both branches
    trainer = make_trainer(accumulation)
    logger = GradNormLogger(flush_every=3)
    logger.attach(trainer)
    trainer.run(batches, max_epochs=2)
    assert [step for step, _ in logger.norms] == list(range(1, len(expected) + 1))
    assert [norm for _, norm in logger.norms] == pytest.approx(expected, rel=1e-5)
    assert logger.steps_seen == len(expected)
    assert logger.steps_clipped == clipped
    assert logger.clipped_fraction == pytest.approx(clipped / len(expected))


def test_without_clipping_no_step_counts_as_clipped():
    trainer = make_trainer(max_norm=None)
    logger = GradNormLogger()
    logger.attach(trainer)
    trainer.run(regression_batches(40, 4), max_epochs=1)
    assert logger.steps_seen == 10 and logger.steps_clipped == 0 and logger.clipped_fraction == 0.0


def test_writer_gets_every_step_and_a_summary_per_flush():
    writer = FakeWriter()
    trainer = make_trainer(accumulation=1)
    logger = GradNormLogger(flush_every=4, writer=writer, bins=5)
    logger.attach(trainer)
    trainer.run(regression_batches(40, 4), max_epochs=1)  # 10 steps: flushes after 4, 8, epoch end
    pre_clip = [(value, step) for tag, value, step in writer.scalars if tag == "grad_norm/pre_clip"]
    assert pre_clip == [(norm, step) for step, norm in logger.norms]
    fractions = [(step, value) for tag, value, step in writer.scalars if tag == "grad_norm/clipped_fraction"]
    assert [step for step, _ in fractions] == [4, 8, 10]
    assert fractions[-1][1] == logger.clipped_fraction
    assert [(tag, step, bins) for tag, _, step, bins in writer.histograms] == [
        ("grad_norm/histogram", 4, 5),
        ("grad_norm/histogram", 8, 5),
        ("grad_norm/histogram", 10, 5),
    ]
    assert sum(len(values) for _, values, _, _ in writer.histograms) == 10
    assert {tag for tag, _, _ in writer.scalars} == {"grad_norm/pre_clip", "grad_norm/clipped_fraction"}


@pytest.mark.parametrize("n_batches, flushes", [(8, 2), (10, 3)])
def test_host_reads_are_amortized(n_batches, flushes):
    trainer = make_trainer(accumulation=1)
    logger = GradNormLogger(flush_every=4)
    logger.attach(trainer)
    seen = []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda: seen.append(logger.flushes))
    trainer.run(regression_batches(4 * n_batches, 4), max_epochs=1)
    assert seen[:8] == [0, 0, 0, 1, 1, 1, 1, 2]  # one transfer per 4 steps, none per step
    assert logger.flushes == flushes  # the epoch end flushes only a pending remainder
    assert logger.steps_seen == n_batches


def test_logs_once_per_optimizer_step_not_per_micro_batch():
    trainer = make_trainer(accumulation=4)
    logger = GradNormLogger(flush_every=100)
    logger.attach(trainer)
    trainer.run(regression_batches(40, 4), max_epochs=1)
    assert logger.flushes == 1  # everything pending was read once, at the epoch end
    assert [step for step, _ in logger.norms] == [1, 2, 3]


def test_state_round_trips_and_includes_pending_values():
    trainer = make_trainer()
    logger = GradNormLogger(flush_every=50)
    logger.attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=6), lambda e: e.terminate())
    states = []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED(once=6), lambda: states.append(logger.state_dict()))
    trainer.run(regression_batches(40, 4), max_epochs=1)
    state = states[0]
    assert set(state) == {"norms", "steps_seen", "steps_clipped"}
    assert len(state["norms"]) == state["steps_seen"] == 6  # flushed before being saved
    restored = GradNormLogger()
    restored.load_state_dict(state)
    assert restored.norms == logger.norms and restored.steps_clipped == logger.steps_clipped
    again = restored.state_dict()
    assert torch.equal(again.pop("norms"), state["norms"]) and again == {k: state[k] for k in again}
    with pytest.raises(ValueError, match="missing keys \\['steps_clipped'\\].*To fix"):
        restored.load_state_dict({"norms": [], "steps_seen": 0})
    with pytest.raises(ValueError, match="unexpected keys \\['extra'\\]"):
        restored.load_state_dict({**state, "extra": 1})


def test_every_saved_state_holds_the_whole_history_saved_between_and_after_a_load():
    trainer = make_trainer()
    logger = GradNormLogger(flush_every=3)
    logger.attach(trainer)
    saved = []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED(every=4), lambda: saved.append(logger.state_dict()))
    trainer.run(regression_batches(40, 4), max_epochs=1)  # 10 steps: saves at 4 and 8, flushes in between
    for state in saved:
        expected = torch.tensor(logger.norms[: state["steps_seen"]], dtype=torch.float64)
        assert torch.equal(state["norms"], expected)
    saved[0]["norms"][0, 1] = -1.0  # a state is a copy: editing it leaves the logger alone
    assert logger.state_dict()["norms"].tolist() == [[s, n] for s, n in logger.norms]
    restored = GradNormLogger(flush_every=2)
    restored.load_state_dict(saved[1])
    other = make_trainer()
    restored.attach(other)
    other.run(regression_batches(12, 4), max_epochs=1)  # 3 more steps after the loaded history
    after = restored.norms[8:]
    assert len(after) == 3
    assert restored.state_dict()["norms"].tolist() == [*saved[1]["norms"].tolist(), *[[s, n] for s, n in after]]


def test_registers_for_checkpoints_and_refuses_a_second_attach():
    trainer = make_trainer()
    logger = GradNormLogger()
    logger.attach(trainer)
    assert stateful_objects(trainer)["grad_norm"] is logger
    with pytest.raises(RuntimeError, match="already attached"):
        logger.attach(trainer)


def test_refuses_an_engine_without_step_events():
    with pytest.raises(RuntimeError, match="StepEvents.*To fix: attach it to the trainer"):
        GradNormLogger().attach(noop_engine())
    with pytest.raises(RuntimeError, match="evaluator"):
        GradNormLogger().attach(create_evaluator(mlp(in_features=2, out=1)))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"flush_every": 0}, ValueError),
        ({"flush_every": 2.5}, TypeError),
        ({"flush_every": True}, TypeError),
        ({"writer": object()}, TypeError),
        ({"bins": 0}, ValueError),
        ({"bins": None}, ValueError),
    ],
)
def test_bad_options_are_refused(kwargs, error):
    with pytest.raises(error, match="To fix"):
        GradNormLogger(**kwargs)


def test_skipped_fp16_steps_are_not_logged(monkeypatch):
    monkeypatch.setattr(trainer_module, "resolve_precision", lambda precision, device: Precision("fp16", "cpu"))
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, precision="fp16")
    logger = GradNormLogger()
    logger.attach(trainer)
    x, y = regression_batches(8, 4)[0]
    trainer.run([(x, torch.full_like(y, float("inf"))), (x, y)], max_epochs=1)
    assert trainer.state.skipped_steps == 1 and trainer.state.optimizer_steps == 1
    assert [step for step, _ in logger.norms] == [1]


def test_attaching_asks_the_step_for_the_norm_and_a_step_without_one_is_skipped():
    trainer = make_trainer(max_norm=None)
    assert not getattr(trainer.step, "track_grad_norm", False)  # the norm costs a pass over the gradients
    logger = GradNormLogger(flush_every=2)
    logger.attach(trainer)
    assert trainer.step.track_grad_norm is True
    trainer.step.track_grad_norm = False  # e.g. a core that hands out no norm: nothing to log, no error
    trainer.run(regression_batches(16, 4), max_epochs=1)
    assert logger.steps_seen == 0 and logger.norms == [] and logger.flushes == 0


def test_a_summary_writer_gets_every_step_and_the_histograms(tmp_path):
    from tests.handlers.test_tensorboard import read_events

    writer = SummaryWriter(logdir=str(tmp_path))
    trainer = make_trainer(accumulation=1)
    logger = GradNormLogger(flush_every=4, writer=writer, bins=5)
    logger.attach(trainer)
    trainer.run(regression_batches(40, 4), max_epochs=1)  # 10 steps: flushes after 4, 8, epoch end
    writer.close()
    events = read_events(tmp_path)
    pre_clip = [(e.step, v.simple_value) for e in events for v in e.summary.value if v.tag == "grad_norm/pre_clip"]
    assert [s for s, _ in pre_clip] == [s for s, _ in logger.norms]
    assert [v for _, v in pre_clip] == pytest.approx([n for _, n in logger.norms], rel=1e-6)
    fractions = [(e.step, v.simple_value) for e in events for v in e.summary.value
                 if v.tag == "grad_norm/clipped_fraction"]
    assert [s for s, _ in fractions] == [4, 8, 10] and fractions[-1][1] == pytest.approx(logger.clipped_fraction)
    histograms = [(e.step, v.histo) for e in events for v in e.summary.value if v.tag == "grad_norm/histogram"]
    assert [s for s, _ in histograms] == [4, 8, 10]
    assert [h.num for _, h in histograms] == [4, 4, 2]
    assert histograms[0][1].sum == pytest.approx(sum(n for _, n in logger.norms[:4]), rel=1e-6)
