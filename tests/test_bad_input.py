"""Every user mistake gets a typed error naming the value and saying "To fix:" (acceptance 8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine_kit import create_evaluator, create_trainer
from tests.helpers import mlp, regression_batches


def trainer_for(**kwargs):
    model = kwargs.pop("model", None) or mlp(in_features=2, out=1)
    opt = kwargs.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = kwargs.pop("loss_fn", F.mse_loss)
    return create_trainer(model, opt, loss_fn, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"accumulation_steps": 0}, ValueError, r"accumulation_steps=0 .*To fix:"),
        ({"accumulation_steps": -3}, ValueError, r"accumulation_steps=-3 .*To fix:"),
        ({"accumulation_steps": 2.5}, TypeError, r"accumulation_steps=2.5 .*To fix:"),
        ({"max_grad_norm": 0}, ValueError, r"max_grad_norm=0 .*To fix:"),
        ({"max_grad_norm": -1.0}, ValueError, r"max_grad_norm=-1.0 .*To fix:"),
        ({"max_grad_norm": float("nan")}, ValueError, r"max_grad_norm=nan .*To fix:"),
        ({"max_grad_norm": "1"}, TypeError, r"max_grad_norm='1' .*To fix:"),
        ({"precision": "fp8"}, ValueError, r"precision='fp8' .*To fix:"),
        ({"precision": "fp16"}, ValueError, r"precision='fp16' needs a CUDA device.*To fix:"),
        ({"device": "tpu9"}, ValueError, r"device='tpu9'.*To fix:"),
    ],
)
def test_bad_options_are_refused_at_construction(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        trainer_for(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda():
    with pytest.raises(ValueError, match=r"device='cuda' but CUDA is not available.*To fix:"):
        trainer_for(device="cuda")


def test_evaluator_refuses_unknown_precision():
    with pytest.raises(ValueError, match=r"precision='half'.*To fix:"):
        create_evaluator(mlp(), precision="half")


def test_loss_that_is_not_a_scalar():
    trainer = trainer_for(loss_fn=lambda y_pred, y: F.mse_loss(y_pred, y, reduction="none"))
    with pytest.raises(Exception, match=r"shape \(4, 1\), not a scalar.*To fix:") as info:
        trainer.run(regression_batches(8, 4), max_epochs=1)
    assert isinstance(info.value, ValueError)


def test_loss_that_is_not_a_tensor():
    trainer = trainer_for(loss_fn=lambda y_pred, y: 0.5)
    with pytest.raises(TypeError, match=r"loss_fn returned a float.*To fix:"):
        trainer.run(regression_batches(8, 4), max_epochs=1)


def test_loss_without_grad():
    trainer = trainer_for(loss_fn=lambda y_pred, y: F.mse_loss(y_pred.detach(), y))
    with pytest.raises(ValueError, match=r"does not require grad.*To fix:"):
        trainer.run(regression_batches(8, 4), max_epochs=1)


def test_batch_that_is_not_a_pair():
    trainer = trainer_for()
    triples = [(torch.randn(4, 2), torch.randn(4, 1), torch.zeros(4))]
    with pytest.raises(TypeError, match=r"tuple of length 3.*\(x, y\) pair.*To fix:.*prepare_batch"):
        trainer.run(triples, max_epochs=1)
    with pytest.raises(TypeError, match=r"batch is a Tensor.*To fix:"):
        trainer_for().run([torch.randn(4, 2)], max_epochs=1)


def test_custom_prepare_batch_accepts_other_layouts():
    trainer = trainer_for(prepare_batch=lambda batch, device, nb: (batch["x"], batch["y"]))
    data = [{"x": x, "y": y} for x, y in regression_batches(8, 4)]
    assert trainer.run(data, max_epochs=1).optimizer_steps == 2


def test_optimizer_of_another_model():
    model = mlp(in_features=2, out=1)
    other = mlp(in_features=2, out=1)
    with pytest.raises(ValueError, match=r"not parameters of the model.*To fix:"):
        trainer_for(model=model, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))


def test_optimizer_missing_some_parameters_warns():
    model = mlp(in_features=2, out=1)
    with pytest.warns(UserWarning, match="not in the optimizer"):
        trainer_for(model=model, optimizer=torch.optim.SGD(model[0].parameters(), lr=0.1))


def test_wrong_types_for_model_and_optimizer():
    model = mlp(in_features=2, out=1)
    with pytest.raises(TypeError, match="model is a str.*To fix:"):
        create_trainer("net", torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss)
    with pytest.raises(TypeError, match="optimizer is a dict.*To fix:"):
        create_trainer(model, {}, F.mse_loss)


# --- The full matrix: every argument, wrong type / out of range / NaN-inf / empty / wrong shape. ---

import math  # noqa: E402
import os  # noqa: E402

from ignite.engine import Engine  # noqa: E402
from ignite.metrics import Accuracy  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from engine_kit import ResumableLoader  # noqa: E402
from engine_kit.errors import RunDirectoryError  # noqa: E402
from handlers import (  # noqa: E402
    CheckpointRotation,
    EarlyStopping,
    GradNormLogger,
    NanGuard,
    ProgressBar,
    StepLog,
    TensorBoardLogger,
    Validation,
    attach_scheduler,
    attach_standard,
    warmup_cosine,
)

NAN, INF = float("nan"), math.inf


def dataset(n=12):
    return TensorDataset(torch.randn(n, 2), torch.randn(n, 1))


def evaluator():
    return create_evaluator(mlp(in_features=2, out=1))


def make_trainer(**kwargs):
    return trainer_for(**kwargs)


def standard(tmp, **kwargs):
    model = mlp(in_features=2, out=3)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy)
    kwargs.setdefault("run_dir", tmp)
    return attach_standard(trainer, create_evaluator(model, metrics={"accuracy": Accuracy()}), [], **kwargs)


# (case id, call(tmp_path), error type, text the message must show)
CONSTRUCTION = [
    # create_trainer
    ("trainer-loss_fn-not-callable", lambda t: trainer_for(loss_fn="mse"), TypeError, "loss_fn is a str"),
    ("trainer-prepare_batch-not-callable", lambda t: trainer_for(prepare_batch=3), TypeError, "prepare_batch is a int"),
    ("trainer-batch_size_fn-not-callable", lambda t: trainer_for(batch_size_fn="len"), TypeError, "batch_size_fn is a str"),
    ("trainer-non_blocking-yes", lambda t: trainer_for(non_blocking="yes"), TypeError, "non_blocking='yes'"),
    ("trainer-track_grad_norm-1", lambda t: trainer_for(track_grad_norm=1), TypeError, "track_grad_norm=1"),
    ("trainer-accumulation-nan", lambda t: trainer_for(accumulation_steps=NAN), TypeError, "accumulation_steps=nan"),
    ("trainer-accumulation-bool", lambda t: trainer_for(accumulation_steps=True), TypeError, "accumulation_steps=True"),
    ("trainer-accumulation-str", lambda t: trainer_for(accumulation_steps="4"), TypeError, "accumulation_steps='4'"),
    ("trainer-max_grad_norm-inf", lambda t: trainer_for(max_grad_norm=INF), ValueError, "max_grad_norm=inf"),
    ("trainer-precision-none", lambda t: trainer_for(precision=None), ValueError, "precision=None"),
    ("trainer-device-float", lambda t: trainer_for(device=1.5), ValueError, "device=1.5"),
    ("trainer-device-empty", lambda t: trainer_for(device=""), ValueError, "device=''"),
    # create_evaluator
    ("evaluator-model", lambda t: create_evaluator("net"), TypeError, "model is a str"),
    ("evaluator-metrics-list", lambda t: create_evaluator(mlp(), metrics=[Accuracy()]), TypeError, "metrics is a list"),
    ("evaluator-metrics-value", lambda t: create_evaluator(mlp(), metrics={"acc": 3}), TypeError, "metrics['acc'] is a int"),
    ("evaluator-metrics-empty-name", lambda t: create_evaluator(mlp(), metrics={"": Accuracy()}), TypeError, "metric name ''"),
    ("evaluator-device", lambda t: create_evaluator(mlp(), device="tpu9"), ValueError, "device='tpu9'"),
    ("evaluator-prepare_batch", lambda t: create_evaluator(mlp(), prepare_batch=[]), TypeError, "prepare_batch is a list"),
    ("evaluator-non_blocking", lambda t: create_evaluator(mlp(), non_blocking="yes"), TypeError, "non_blocking='yes'"),
    # trainer.run
    ("run-data-int", lambda t: make_trainer().run(5), TypeError, "data is a int"),
    ("run-data-str", lambda t: make_trainer().run("batches"), TypeError, "data is a str"),
    ("run-data-empty", lambda t: make_trainer().run([]), ValueError, "data is an empty list"),
    ("run-max_epochs-0", lambda t: make_trainer().run(regression_batches(8, 4), max_epochs=0), ValueError, "max_epochs=0"),
    ("run-max_epochs-neg", lambda t: make_trainer().run(regression_batches(8, 4), max_epochs=-1), ValueError, "max_epochs=-1"),
    ("run-max_epochs-1.5", lambda t: make_trainer().run(regression_batches(8, 4), max_epochs=1.5), TypeError, "max_epochs=1.5"),
    ("run-max_epochs-inf", lambda t: make_trainer().run(regression_batches(8, 4), max_epochs=INF), TypeError, "max_epochs=inf"),
    ("run-max_iters-0", lambda t: make_trainer().run(regression_batches(8, 4), max_iters=0), ValueError, "max_iters=0"),
    ("run-epoch_length-2.5", lambda t: make_trainer().run(regression_batches(8, 4), epoch_length=2.5), TypeError, "epoch_length=2.5"),
    ("run-both-limits", lambda t: make_trainer().run(regression_batches(8, 4), max_epochs=1, max_iters=2), ValueError, "max_iters=2"),
    # ResumableLoader
    ("loader-dataset-int", lambda t: ResumableLoader(5, batch_size=4), TypeError, "int"),
    ("loader-dataset-empty", lambda t: ResumableLoader(dataset(0), batch_size=4), ValueError, "empty"),
    ("loader-batch_size-0", lambda t: ResumableLoader(dataset(), batch_size=0), ValueError, "batch_size=0"),
    ("loader-batch_size-float", lambda t: ResumableLoader(dataset(), batch_size=2.5), TypeError, "batch_size=2.5"),
    ("loader-batch_size-nan", lambda t: ResumableLoader(dataset(), batch_size=NAN), TypeError, "batch_size=nan"),
    ("loader-shuffle-str", lambda t: ResumableLoader(dataset(), batch_size=4, shuffle="yes"), TypeError, "shuffle='yes'"),
    ("loader-drop_last-int", lambda t: ResumableLoader(dataset(), batch_size=4, drop_last=1), TypeError, "drop_last=1"),
    ("loader-seed-float", lambda t: ResumableLoader(dataset(), batch_size=4, seed=1.5), TypeError, "seed=1.5"),
    ("loader-num_workers-neg", lambda t: ResumableLoader(dataset(), batch_size=4, num_workers=-1), ValueError, "num_workers=-1"),
    ("loader-collate_fn", lambda t: ResumableLoader(dataset(), batch_size=4, collate_fn=3), TypeError, "collate_fn is a int"),
    ("loader-worker_init_fn", lambda t: ResumableLoader(dataset(), batch_size=4, worker_init_fn="f"), TypeError, "worker_init_fn is a str"),
    ("loader-prefetch-0", lambda t: ResumableLoader(dataset(), batch_size=4, num_workers=1, prefetch_factor=0), ValueError, "prefetch_factor=0"),
    ("loader-pin_memory-str", lambda t: ResumableLoader(dataset(), batch_size=4, pin_memory="yes"), TypeError, "pin_memory='yes'"),
    ("loader-rank-out-of-range", lambda t: ResumableLoader(dataset(), batch_size=4, num_replicas=2, rank=2), ValueError, "rank=2"),
    ("loader-replicas-0", lambda t: ResumableLoader(dataset(), batch_size=4, num_replicas=0, rank=0), ValueError, "num_replicas=0"),
    # Validation
    ("validation-evaluator", lambda t: Validation("eval", [], every_epochs=1), TypeError, "evaluator is a str"),
    ("validation-every_epochs-0", lambda t: Validation(evaluator(), [], every_epochs=0), ValueError, "every_epochs=0"),
    ("validation-every_steps-float", lambda t: Validation(evaluator(), [], every_steps=1.5), TypeError, "every_steps=1.5"),
    ("validation-both", lambda t: Validation(evaluator(), [], every_epochs=1, every_steps=5), ValueError, "every_steps=5"),
    ("validation-loader-int", lambda t: Validation(evaluator(), 3, every_epochs=1), TypeError, "loader is a int"),
    # EarlyStopping
    ("early-metric-empty", lambda t: EarlyStopping(metric="", patience=3), ValueError, "metric"),
    ("early-metric-int", lambda t: EarlyStopping(metric=3, patience=3), TypeError, "metric=3"),
    ("early-patience-0", lambda t: EarlyStopping(metric="loss", patience=0), ValueError, "patience=0"),
    ("early-patience-nan", lambda t: EarlyStopping(metric="loss", patience=NAN), TypeError, "patience=nan"),
    ("early-min_delta-nan", lambda t: EarlyStopping(metric="loss", patience=3, min_delta=NAN), ValueError, "min_delta=nan"),
    ("early-min_delta-inf", lambda t: EarlyStopping(metric="loss", patience=3, min_delta=INF), ValueError, "min_delta=inf"),
    ("early-min_delta-neg", lambda t: EarlyStopping(metric="loss", patience=3, min_delta=-1), ValueError, "min_delta=-1"),
    ("early-mode", lambda t: EarlyStopping(metric="loss", patience=3, mode="best"), ValueError, "mode='best'"),
    # GradNormLogger
    ("gradnorm-flush_every-0", lambda t: GradNormLogger(flush_every=0), ValueError, "flush_every=0"),
    ("gradnorm-writer", lambda t: GradNormLogger(writer=object()), TypeError, "writer is a object"),
    ("gradnorm-bins-0", lambda t: GradNormLogger(bins=0), ValueError, "bins=0"),
    # TensorBoardLogger
    ("tb-log_dir-int", lambda t: TensorBoardLogger(log_dir=3), TypeError, "log_dir=3"),
    ("tb-log_dir-file", lambda t: TensorBoardLogger(log_dir=_file(t)), RunDirectoryError, "a-file"),
    ("tb-log_dir-too-long", lambda t: TensorBoardLogger(log_dir=t / ("x" * 300)), RunDirectoryError, "x" * 300),
    ("tb-log_every-0", lambda t: TensorBoardLogger(log_dir=t, log_every=0), ValueError, "log_every=0"),
    ("tb-writer", lambda t: TensorBoardLogger(writer=object()), TypeError, "writer is a object"),
    # StepLog
    ("steplog-path-int", lambda t: StepLog(3), TypeError, "path=3"),
    ("steplog-missing-dir", lambda t: StepLog(t / "nope" / "steps.jsonl"), ValueError, "nope"),
    ("steplog-path-is-dir", lambda t: StepLog(_file(t).parent), RunDirectoryError, "not a regular file"),
    ("steplog-parent-is-file", lambda t: StepLog(_file(t) / "steps.jsonl"), RunDirectoryError, "a-file"),
    ("steplog-name-too-long", lambda t: StepLog(t / ("s" * 300)), RunDirectoryError, "s" * 300),
    ("steplog-flush_every-float", lambda t: StepLog(t / "s.jsonl", flush_every=2.5), TypeError, "flush_every=2.5"),
    # ProgressBar, NanGuard
    ("progress-every-0", lambda t: ProgressBar(every=0), ValueError, "every=0"),
    ("progress-persist-str", lambda t: ProgressBar(persist="yes"), TypeError, "persist='yes'"),
    ("nanguard-check_every-0", lambda t: NanGuard(check_every=0), ValueError, "check_every=0"),
    ("nanguard-check_every-inf", lambda t: NanGuard(check_every=INF), TypeError, "check_every=inf"),
    # CheckpointRotation
    ("rotation-dirname-int", lambda t: CheckpointRotation(3), TypeError, "3"),
    ("rotation-dirname-file", lambda t: CheckpointRotation(_file(t)), Exception, "a-file"),
    ("rotation-every_steps-0", lambda t: CheckpointRotation(t, every_steps=0), ValueError, "every_steps=0"),
    ("rotation-keep_last-0", lambda t: CheckpointRotation(t, keep_last=0), ValueError, "keep_last=0"),
    ("rotation-keep_last-float", lambda t: CheckpointRotation(t, keep_last=1.5), ValueError, "keep_last=1.5"),
    ("rotation-keep_best-neg", lambda t: CheckpointRotation(t, keep_best=-1), ValueError, "keep_best=-1"),
    ("rotation-keep_best-no-metric", lambda t: CheckpointRotation(t, keep_best=1), ValueError, "keep_best=1"),
    ("rotation-mode", lambda t: CheckpointRotation(t, mode="best"), ValueError, "mode='best'"),
    ("rotation-at_epoch_end-str", lambda t: CheckpointRotation(t, at_epoch_end="yes"), TypeError, "at_epoch_end='yes'"),
    ("rotation-strict-str", lambda t: CheckpointRotation(t, strict="no"), TypeError, "strict='no'"),
    ("rotation-resume-int", lambda t: CheckpointRotation(t, resume=3), TypeError, "resume=3"),
    # attach_standard
    ("standard-run_dir-int", lambda t: standard(t, run_dir=3), TypeError, "run_dir=3"),
    ("standard-run_dir-file", lambda t: standard(t, run_dir=_file(t)), RunDirectoryError, "a-file"),
    ("standard-metric-empty", lambda t: standard(t, metric=""), ValueError, "metric"),
    ("standard-mode", lambda t: standard(t, mode="up"), ValueError, "mode='up'"),
    ("standard-validate_every_epochs-0", lambda t: standard(t, validate_every_epochs=0), ValueError, "every_epochs=0"),
    ("standard-checkpoint_every_steps-0", lambda t: standard(t, checkpoint_every_steps=0), ValueError, "every_steps=0"),
    ("standard-keep_last-neg", lambda t: standard(t, keep_last=-1), ValueError, "keep_last=-1"),
    ("standard-patience-0", lambda t: standard(t, patience=0), ValueError, "patience=0"),
    ("standard-log_every-nan", lambda t: standard(t, log_every=NAN), TypeError, "log_every=nan"),
    ("standard-progress-str", lambda t: standard(t, progress="yes"), TypeError, "progress='yes'"),
    ("standard-doctor-str", lambda t: standard(t, doctor="yes"), TypeError, "doctor='yes'"),
    # schedulers
    ("scheduler-not-a-scheduler", lambda t: attach_scheduler(make_trainer(), "cosine"), TypeError, "scheduler is a str"),
    ("warmup-steps-neg", lambda t: warmup_cosine(_opt(), warmup_steps=-1, total_steps=10), ValueError, "warmup_steps=-1"),
    ("warmup-total-0", lambda t: warmup_cosine(_opt(), warmup_steps=0, total_steps=0), ValueError, "total_steps=0"),
    ("warmup-min_lr-nan", lambda t: warmup_cosine(_opt(), warmup_steps=1, total_steps=10, min_lr=NAN), ValueError, "min_lr=nan"),
]


def _file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return path


def _opt():
    return torch.optim.SGD(mlp().parameters(), lr=0.1)


@pytest.mark.parametrize("case, call, error, shown", CONSTRUCTION, ids=[c[0] for c in CONSTRUCTION])
def test_every_bad_argument_is_refused_naming_the_value(case, call, error, shown, tmp_path):
    with pytest.raises(error) as info:
        call(tmp_path)
    message = str(info.value)
    assert "To fix" in message, message
    assert shown in message, message


def _count_as(value):
    return lambda x, y: value


# Data-dependent mistakes: refused at the first micro-batch, before any optimizer step.
RUNTIME = [
    ("size-0-batch", {}, [(torch.randn(0, 2), torch.randn(0, 1))], ValueError, "empty batch"),
    ("size-0-batch-later", {"accumulation_steps": 2}, regression_batches(4, 4) + [(torch.randn(0, 2), torch.randn(0, 1))], ValueError, "empty batch"),
    ("batch_size_fn-str", {"batch_size_fn": _count_as("4")}, regression_batches(8, 4), TypeError, "'4'"),
    ("batch_size_fn-nan", {"batch_size_fn": _count_as(NAN)}, regression_batches(8, 4), ValueError, "nan"),
    ("batch_size_fn-negative", {"batch_size_fn": _count_as(-4)}, regression_batches(8, 4), ValueError, "-4"),
    ("batch_size_fn-inf", {"batch_size_fn": _count_as(INF)}, regression_batches(8, 4), ValueError, "inf"),
    ("batch_size_fn-nan-tensor", {"batch_size_fn": _count_as(torch.tensor(NAN))}, regression_batches(8, 4), ValueError, "nan"),
    ("prepare_batch-one-value", {"prepare_batch": lambda b, d, nb: b[0]}, regression_batches(8, 4), TypeError, "Tensor"),
    ("prepare_batch-three-values", {"prepare_batch": lambda b, d, nb: (*b, b[0])}, regression_batches(8, 4), TypeError, "tuple of length 3"),
]


@pytest.mark.parametrize("case, kwargs, data, error, shown", RUNTIME, ids=[c[0] for c in RUNTIME])
def test_bad_batches_are_refused_before_any_step(case, kwargs, data, error, shown):
    model = mlp(in_features=2, out=1)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, **kwargs)
    with pytest.raises(error) as info:
        trainer.run(data, max_epochs=1)
    assert "To fix" in str(info.value) and shown in str(info.value), str(info.value)
    if case != "size-0-batch-later":
        assert trainer.state.optimizer_steps == 0
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("kwargs", [{"max_epochs": 1}, {"max_iters": 3}, {"epoch_length": 2}])
def test_good_run_arguments_still_run(kwargs):
    assert make_trainer().run(regression_batches(16, 4), **kwargs).iteration in (2, 3, 4)


@pytest.mark.parametrize("make_logger", [
    lambda directory: TensorBoardLogger(log_dir=directory),
    lambda directory: StepLog(directory / "steps.jsonl"),
], ids=["TensorBoardLogger", "StepLog"])
def test_loggers_refuse_a_read_only_directory_at_construction(make_logger, tmp_path, monkeypatch):
    import errno

    import engine_kit.run_directory as run_directory

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    # As root, chmod does not stop writes: simulate a read-only mount at the write probe.
    monkeypatch.setattr(run_directory.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(RunDirectoryError, match=rf"{tmp_path}.*not writable.*To fix"):
        make_logger(tmp_path)
