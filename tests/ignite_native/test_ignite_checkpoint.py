"""ignite's Checkpoint with engine_kit.resumable_objects: saved on an optimizer step it resumes
bitwise; saved inside an accumulation window it is refused before anything is loaded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver
from torch.utils.data import TensorDataset

from engine_kit import CheckpointMismatchError, ResumableLoader, StepEvents, create_trainer, resumable_objects
from handlers import EarlyStopping
from tests.helpers import mlp

EPOCHS = 2


def dataset():
    gen = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(44, 2, generator=gen), torch.randn(44, 1, generator=gen))


def build():
    model = mlp(in_features=2, out=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    trainer = create_trainer(model, optimizer, F.mse_loss, accumulation_steps=4, max_grad_norm=1.0)
    EarlyStopping(metric="loss", patience=100).attach(trainer)  # a registered stateful handler
    loader = ResumableLoader(dataset(), batch_size=4, shuffle=True, seed=7)  # 11 batches: windows 4, 4, 3
    return model, trainer, loader


def saved_checkpoints(tmp_path, event):
    model, trainer, loader = build()
    objects = resumable_objects(trainer)
    checkpoint = Checkpoint(objects, DiskSaver(str(tmp_path), require_empty=False), n_saved=None)
    trainer.add_event_handler(event, checkpoint)
    trainer.run(loader, max_epochs=EPOCHS)
    return model, sorted(tmp_path.iterdir(), key=lambda p: p.stat().st_mtime_ns)


def test_helper_lists_every_object_that_makes_the_trainer_resumable():
    model, trainer, _ = build()
    objects = resumable_objects(trainer)
    assert list(objects) == ["trainer", "model", "optimizer", "scaler", "early_stopping"]
    assert objects["model"] is model and objects["optimizer"] is trainer.step.optimizer
    assert objects["scaler"] is trainer.state.scaler


def test_checkpoint_on_an_optimizer_step_resumes_bitwise(tmp_path):
    uninterrupted, files = saved_checkpoints(tmp_path, StepEvents.OPTIMIZER_STEP_COMPLETED(every=2))
    assert len(files) == 3  # steps 2, 4, 6 of 6
    for file in files[:2]:  # step 2 (mid-epoch) and step 4 (second epoch)
        model, trainer, loader = build()
        objects = resumable_objects(trainer)
        Checkpoint.load_objects(objects, torch.load(file, weights_only=False))
        trainer.run(loader, max_epochs=EPOCHS)
        assert trainer.state.optimizer_steps == 6
        for got, want in zip(model.parameters(), uninterrupted.parameters()):
            assert torch.equal(got, want)


def test_checkpoint_inside_a_window_is_refused_before_anything_is_loaded(tmp_path):
    with pytest.warns(UserWarning, match=r"inside an accumulation window.*To fix: save on StepEvents"):
        _, files = saved_checkpoints(tmp_path, Events.ITERATION_COMPLETED(every=3))
    model, trainer, _ = build()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointMismatchError, match=r"window_position=3 .*Nothing was loaded.*To fix:"):
        Checkpoint.load_objects(resumable_objects(trainer), torch.load(files[0], weights_only=False))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert trainer.state.iteration == 0


def test_model_checkpoint_on_optimizer_steps_names_files_by_step(tmp_path):
    from ignite.handlers import ModelCheckpoint, global_step_from_engine

    model, trainer, loader = build()
    by_step = global_step_from_engine(trainer, StepEvents.OPTIMIZER_STEP_COMPLETED)
    saver = ModelCheckpoint(str(tmp_path), "run", n_saved=2, require_empty=False, global_step_transform=by_step)
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED(every=2), saver, {"model": model})
    trainer.run(loader, max_epochs=EPOCHS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_model_4.pt", "run_model_6.pt"]  # optimizer steps
    saved = torch.load(tmp_path / "run_model_6.pt", weights_only=True)
    assert all(torch.equal(saved[name], value) for name, value in model.state_dict().items())
