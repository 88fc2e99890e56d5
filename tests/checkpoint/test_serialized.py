"""serialize_small: a small CPU payload serialized on the calling thread writes the very same checkpoint file."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from engine_kit.checkpoint import load_checkpoint_file, verify_checkpoint_file
from engine_kit.checkpoint import serialized as serialized_module
from engine_kit.checkpoint.fileformat import save_checkpoint_file
from engine_kit.checkpoint.record import CheckpointRecord
from engine_kit.checkpoint.serialized import SerializedPayload, serialize_small
from engine_kit.checkpoint.streaming import write_sealed


def _payload() -> dict:
    model = torch.nn.Linear(3, 2)
    return {"model": model.state_dict(), "view": torch.arange(10.0)[1:8:3], "meta": {"step": 7}, "nested": [1, ("a", 2.5)]}


def test_the_archive_is_what_torch_save_writes_and_seals_into_the_same_file() -> None:
    payload = _payload()
    small = serialize_small(payload)
    assert isinstance(small, SerializedPayload) and small.meta == {"step": 7}
    plain = io.BytesIO()
    torch.save(payload, plain)
    assert small.archive == plain.getvalue()
    record = CheckpointRecord("a.ekpt", step=7, epoch=1, order=3)
    streamed, inline = io.BytesIO(), io.BytesIO()
    first, second = write_sealed(streamed, payload, record), write_sealed(inline, small, record)
    assert streamed.getvalue() == inline.getvalue() and first == second


def test_a_serialized_payload_saves_loads_and_verifies(tmp_path: Path) -> None:
    payload = _payload()
    info = save_checkpoint_file(tmp_path / "a.ekpt", serialize_small(payload), record=CheckpointRecord("a.ekpt", step=7, epoch=1, order=1))
    assert info.meta == {"step": 7} and verify_checkpoint_file(tmp_path / "a.ekpt").sha256 == info.sha256
    loaded = load_checkpoint_file(tmp_path / "a.ekpt")
    assert torch.equal(loaded["view"], payload["view"]) and loaded["nested"] == [1, ("a", 2.5)]


def test_too_large_or_unsaveable_payloads_are_left_to_the_writer() -> None:
    weights = torch.zeros(4)  # 16 bytes
    assert serialize_small({"w": weights}, limit_bytes=16) is not None
    assert serialize_small({"w": weights}, limit_bytes=15) is None
    assert serialize_small({"w": weights, "bad": object()}) is None  # the writer names the key in its error
    assert serialize_small({"w": torch.zeros(2, device="meta")}) is None


def test_a_failing_torch_save_is_left_to_the_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot pickle")

    monkeypatch.setattr(serialized_module.torch, "save", refuse)
    assert serialize_small({"w": torch.ones(1)}) is None
