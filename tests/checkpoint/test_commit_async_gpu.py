"""CheckpointDirectory.commit_async of CUDA tensors: a stream-ordered host snapshot, the file of the CPU payload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_kit.checkpoint import CheckpointDirectory
from engine_kit.checkpoint import directory as directory_module

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_commit_async_of_cuda_tensors_writes_the_cpu_payload_even_when_they_change_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(directory_module.time, "time", lambda: 1.0e9)
    weights = torch.randn(1 << 20, device="cuda")
    on_host = {"w": weights.cpu(), "step": 1}
    with CheckpointDirectory(tmp_path / "async", run_id="run") as background:
        pending = background.commit_async("step-1.ekpt", {"w": weights, "step": 1}, step=1, epoch=0)
        weights.mul_(0).add_(7)  # queued after the snapshot's copy on the same stream: it cannot reach the file
        pending.result()
        again = background.commit_async("step-2.ekpt", {"w": weights, "step": 2}, step=2, epoch=0)
        again.result()
        assert background._commits._snapshots.allocations == 1  # the pinned buffer is reused
        assert torch.equal(background.load("step-2.ekpt")["w"], torch.full((1 << 20,), 7.0))
    with CheckpointDirectory(tmp_path / "sync", run_id="run") as sync:
        sync.commit("step-1.ekpt", on_host, step=1, epoch=0)
    assert (tmp_path / "async" / "step-1.ekpt").read_bytes() == (tmp_path / "sync" / "step-1.ekpt").read_bytes()
