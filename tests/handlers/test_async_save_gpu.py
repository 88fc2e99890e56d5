"""Background checkpoint saves of a CUDA model: pinned, reused, stream-ordered snapshots; the same files as sync saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import engine_kit.training_state as training_state_module
from engine_kit import create_trainer
from engine_kit.checkpoint import CheckpointDirectory, directory as directory_module, verify_checkpoint_file
from engine_kit.checkpoint.snapshot import SnapshotBuffers
from handlers.checkpoint import CheckpointRotation
from tests.helpers import regression_batches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_snapshot_is_pinned_reused_and_ordered_before_later_kernels() -> None:
    weights = torch.randn(1 << 20, device="cuda")
    expected = weights.cpu()
    buffers = SnapshotBuffers()
    snapshot = buffers.capture({"w": weights})
    # Queued on the same stream after the copy: it cannot reach the snapshot, even before we wait.
    weights.mul_(0).add_(7)
    snapshot.wait_ready()
    copy = snapshot.payload["w"]
    assert copy.device.type == "cpu" and copy.is_pinned() and torch.equal(copy, expected)
    first_buffer = copy.untyped_storage().data_ptr()
    again = buffers.capture({"w": weights})
    again.wait_ready()
    assert again.payload["w"].untyped_storage().data_ptr() == first_buffer and buffers.allocations == 1
    assert torch.equal(again.payload["w"], torch.full_like(expected, 7.0))


def _run(folder: Path, monkeypatch: pytest.MonkeyPatch, async_save: bool) -> None:
    monkeypatch.setattr(training_state_module.time, "time", lambda: 1.0e9)
    monkeypatch.setattr(directory_module.time, "time", lambda: 1.0e9)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).cuda()
    trainer = create_trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), F.mse_loss, device="cuda")
    rotation = CheckpointRotation(folder, every_steps=2, keep_last=3, async_save=async_save)
    rotation.run_id = "fixed-run-id"
    rotation.attach(trainer)
    trainer.run(regression_batches(24, 4), max_epochs=1)


def test_cuda_async_files_equal_sync_files_and_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(tmp_path / "sync", monkeypatch, async_save=False)
    _run(tmp_path / "async", monkeypatch, async_save=True)
    names = sorted(p.name for p in (tmp_path / "sync").glob("*.ekpt"))
    assert len(names) == 3 and names == sorted(p.name for p in (tmp_path / "async").glob("*.ekpt"))
    for name in names:
        assert (tmp_path / "sync" / name).read_bytes() == (tmp_path / "async" / name).read_bytes(), name
        verify_checkpoint_file(tmp_path / "async" / name)
    entry, payload = CheckpointDirectory(tmp_path / "async", read_only=True).load_newest_valid()
    assert entry.step == 6 and payload["model"]["0.weight"].device.type == "cpu"
