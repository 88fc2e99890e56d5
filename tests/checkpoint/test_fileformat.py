"""One checkpoint file: trailer, corruption, malicious pickles, round trip."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_kit.checkpoint import (
    TEMP_PREFIX,
    CheckpointRecord,
    load_checkpoint_file,
    read_record,
    save_checkpoint_file,
    sha256_file,
    verify_checkpoint_file,
)
from engine_kit.checkpoint import fileformat
from engine_kit.checkpoint.fileformat import MAGIC, MAGIC_V2, TRAILER_SIZE, TRAILER_V2_SIZE, make_trailer
from engine_kit.checkpoint.safety import scan_pickle
from engine_kit.errors import CheckpointCorruptError, CheckpointError, CheckpointWriteError
from tests.checkpoint.conftest import flip_byte, listing, make_payload, payload_matches


def _rich_payload() -> dict:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "dtypes": {str(dt): torch.arange(4).to(dt) for dt in (torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.bool, torch.float64)},
        "non_finite": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]),
        "view": torch.arange(10.0)[2:7],
        "transposed": torch.randn(3, 4, generator=gen).t(),
        "rng": torch.get_rng_state(),
        "numpy_rng_as_tensor": torch.from_numpy(np.random.default_rng(0).integers(0, 2**31, 8)),
        "scalars": [1, 2.5, float("nan"), None, True, "text", b"bytes", (1, 2)],
        "ordered": OrderedDict(a=1),
        "meta": {"step": 7, "format_version": 1},
    }


def _bits(value: object) -> object:
    """Bitwise view of nested tensors (NaN == NaN, -0.0 != 0.0)."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, tuple(value.shape), value.contiguous().view(-1).view(torch.uint8).tolist())
    if isinstance(value, dict):
        return {key: _bits(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_bits(item) for item in value]
    if isinstance(value, float) and value != value:
        return "nan"
    return value


def test_case19_save_load_save_round_trip_is_identical(tmp_path: Path) -> None:
    original = _rich_payload()
    save_checkpoint_file(tmp_path / "a.ekpt", original)
    first = load_checkpoint_file(tmp_path / "a.ekpt")
    save_checkpoint_file(tmp_path / "b.ekpt", first)
    second = load_checkpoint_file(tmp_path / "b.ekpt")
    assert _bits(first) == _bits(original)
    assert _bits(second) == _bits(first)


def test_file_layout_is_zip_record_and_documented_trailer(tmp_path: Path) -> None:
    record = CheckpointRecord("a.ekpt", step=3, epoch=1, order=7, tags=("last",), metric=float("-inf"), run_id="r1", created=5.0)
    info = save_checkpoint_file(tmp_path / "a.ekpt", make_payload(3, numel=16), record=record)
    data = (tmp_path / "a.ekpt").read_bytes()
    trailer = data[-TRAILER_V2_SIZE:]
    assert trailer.startswith(MAGIC_V2)
    archive_length, record_length = struct.unpack(">QQ", trailer[-16:])
    assert archive_length + record_length + TRAILER_V2_SIZE == len(data)
    zip_bytes, record_bytes = data[:archive_length], data[archive_length : archive_length + record_length]
    assert trailer[len(MAGIC_V2) : len(MAGIC_V2) + 32] == hashlib.sha256(zip_bytes + record_bytes).digest()
    assert zip_bytes.startswith(b"PK") and json.loads(record_bytes)["order"] == 7
    assert CheckpointRecord.from_bytes(record_bytes) == read_record(tmp_path / "a.ekpt") == info.record
    assert b"\"metric\":\"-inf\"" in record_bytes  # strict JSON, no bare -Infinity
    assert info.size_bytes == len(data) and info.sha256 == sha256_file(tmp_path / "a.ekpt")
    assert info.meta == {"step": 3, "note": "test"}


def test_format_1_files_without_a_record_still_verify_and_load(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(make_payload(4, numel=16), buffer)
    zip_bytes = buffer.getvalue()
    (tmp_path / "old.ekpt").write_bytes(zip_bytes + make_trailer(zip_bytes))
    assert make_trailer(zip_bytes).startswith(MAGIC) and len(make_trailer(zip_bytes)) == TRAILER_SIZE
    assert verify_checkpoint_file(tmp_path / "old.ekpt").record is None and read_record(tmp_path / "old.ekpt") is None
    assert payload_matches(load_checkpoint_file(tmp_path / "old.ekpt"), 4)
    flip_byte(tmp_path / "old.ekpt", 100)
    with pytest.raises(CheckpointCorruptError, match="does not match the trailer"):
        verify_checkpoint_file(tmp_path / "old.ekpt")


def test_a_file_verifies_on_its_own_when_copied_away(tmp_path: Path) -> None:
    save_checkpoint_file(tmp_path / "a.ekpt", make_payload(5, numel=16))
    elsewhere = tmp_path / "copy" / "renamed.bin"
    elsewhere.parent.mkdir()
    shutil.copy(tmp_path / "a.ekpt", elsewhere)
    info = verify_checkpoint_file(elsewhere)
    assert info.sha256 == sha256_file(tmp_path / "a.ekpt") and info.record.name == "a.ekpt"
    assert load_checkpoint_file(elsewhere)["meta"]["step"] == 5


def _truncations(size: int) -> list[int]:
    return [0, 100, size // 2, size - 4, size - 1]


@pytest.mark.parametrize("which", range(5), ids=["0", "100", "half", "size-4", "size-1"])
def test_case10_truncated_file_is_corrupt(tmp_path: Path, which: int) -> None:
    path = tmp_path / "a.ekpt"
    save_checkpoint_file(path, make_payload(1))
    size = path.stat().st_size
    keep = _truncations(size)[which]
    with open(path, "r+b") as fileobj:
        fileobj.truncate(keep)
    for check in (load_checkpoint_file, verify_checkpoint_file):
        with pytest.raises(CheckpointCorruptError, match="a.ekpt") as info:
            check(path)
        assert "\n" not in str(info.value)


def test_case10_empty_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "empty.ekpt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointCorruptError, match="0 bytes"):
        load_checkpoint_file(path)


def _flip_positions(path: Path) -> dict[str, int]:
    data = path.read_bytes()
    tensor_data = data.find(torch.full((4,), 7.0).numpy().tobytes())
    assert tensor_data > 0
    size = len(data)
    return {
        "first": 0,
        "header": 40,
        "tensor-data": tensor_data + 2,
        "middle": size // 2,
        "magic": size - TRAILER_SIZE,
        "digest": size - TRAILER_SIZE + len(MAGIC) + 5,
        "length": size - 3,
        "last": size - 1,
    }


@pytest.mark.parametrize("where", ["first", "header", "tensor-data", "middle", "magic", "digest", "length", "last"])
def test_case10_one_flipped_byte_is_corrupt(tmp_path: Path, where: str) -> None:
    path = tmp_path / "a.ekpt"
    save_checkpoint_file(path, {"w": torch.full((1 << 12,), 7.0)})
    flip_byte(path, _flip_positions(path)[where])
    for check in (load_checkpoint_file, verify_checkpoint_file):
        with pytest.raises(CheckpointCorruptError, match=r"a\.ekpt.*To fix:"):
            check(path)


def test_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointCorruptError, match="cannot be read"):
        load_checkpoint_file(tmp_path / "nope.ekpt")


def test_expected_sha256_mismatch_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "a.ekpt"
    save_checkpoint_file(path, make_payload(1, numel=8))
    with pytest.raises(CheckpointCorruptError, match="differs from the recorded"):
        load_checkpoint_file(path, expected_sha256="0" * 64)


def test_raw_torch_save_file_without_trailer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "raw.pt"
    torch.save({"w": torch.ones(3)}, path)
    with pytest.raises(CheckpointCorruptError, match="no engine_kit trailer"):
        load_checkpoint_file(path)


def test_case3_unpicklable_payload_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "old.ekpt").write_bytes(b"old")
    before = listing(tmp_path)
    with pytest.raises(CheckpointWriteError, match=r"new\.ekpt.*To fix:"):
        save_checkpoint_file(tmp_path / "new.ekpt", {"lock": threading.Lock(), "w": torch.ones(2)})
    assert listing(tmp_path) == before


def test_payload_that_weights_only_could_not_load_is_refused_at_save(tmp_path: Path) -> None:
    with pytest.raises(CheckpointWriteError, match="numpy"):
        save_checkpoint_file(tmp_path / "a.ekpt", {"rng": np.random.get_state()})
    assert not any(name.startswith(TEMP_PREFIX) or name.endswith(".ekpt") for name in os.listdir(tmp_path))


def test_payload_must_be_a_dict(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="must be a dict"):
        save_checkpoint_file(tmp_path / "a.ekpt", [torch.ones(1)])  # type: ignore[arg-type]


# --- case 13: malicious pickles -------------------------------------------


def _evil_objects(sentinel: Path) -> dict[str, object]:
    class OpensFile:
        def __reduce__(self) -> tuple:
            return (open, (str(sentinel), "w"))

    class RunsShell:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {sentinel}",))

    return {"open": OpensFile(), "system": RunsShell()}


def _torch_save_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("force_unsafe", [False, True], ids=["env-unset", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
@pytest.mark.parametrize("sealed", [True, False], ids=["with-valid-trailer", "raw-torch-save"])
@pytest.mark.parametrize("kind", ["open", "system"])
def test_case13_malicious_pickle_never_executes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, sealed: bool, force_unsafe: bool
) -> None:
    sentinel = tmp_path / "pwned"
    zip_bytes = _torch_save_bytes({"w": torch.ones(2), "evil": _evil_objects(sentinel)[kind]})
    path = tmp_path / "evil.ekpt"
    path.write_bytes(zip_bytes + make_trailer(zip_bytes) if sealed else zip_bytes)
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    expected = "refused: the file carries code" if sealed else "no engine_kit trailer"
    for check in (load_checkpoint_file, verify_checkpoint_file):
        with pytest.raises(CheckpointCorruptError, match=expected):
            check(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("kind", ["open", "system"])
def test_case13_weights_only_alone_still_refuses_under_the_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Defense in depth: with our pickle scan disabled, explicit weights_only=True holds."""
    sentinel = tmp_path / "pwned"
    zip_bytes = _torch_save_bytes({"evil": _evil_objects(sentinel)[kind]})
    path = tmp_path / "evil.ekpt"
    path.write_bytes(zip_bytes + make_trailer(zip_bytes))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(fileformat, "_scan_archive", lambda fileobj, length: None)
    with pytest.raises(CheckpointCorruptError, match="weights_only loading rejects"):
        load_checkpoint_file(path)
    assert not sentinel.exists()


def test_case13_conflicting_env_vars_are_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint_file(tmp_path / "a.ekpt", make_payload(1, numel=4))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "true")
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="To fix: unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        load_checkpoint_file(tmp_path / "a.ekpt")


def test_case13_good_file_still_loads_with_the_env_var_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint_file(tmp_path / "a.ekpt", make_payload(2, numel=4))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert load_checkpoint_file(tmp_path / "a.ekpt")["step"] == 2


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_scan_refuses_code_in_every_protocol(tmp_path: Path, protocol: int) -> None:
    sentinel = tmp_path / "pwned"
    for evil in _evil_objects(sentinel).values():
        with pytest.raises(ValueError, match="not on the allow-list"):
            scan_pickle(pickle.dumps({"x": evil}, protocol=protocol))
    # Benign containers pass in every protocol (protocol 4+ uses STACK_GLOBAL + memo).
    scan_pickle(pickle.dumps([OrderedDict(a=1), OrderedDict(b=2), {1, 2}, b"x"], protocol=protocol))
    assert not sentinel.exists()


def test_pickle_scan_refuses_garbage_with_a_value_error() -> None:
    with pytest.raises(ValueError, match="does not parse"):
        scan_pickle(b"\x80\x02garbage")
