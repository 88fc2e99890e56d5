"""A save is cheap without giving up a guarantee.

One commit (with its retags and rotation) writes the index once and fsyncs
twice (the file, then the directory); the index itself is not fsynced, so
every state a power loss can leave it in must be detected and rebuilt from
the files: an index older than the files, an index newer than the files,
an empty index. The payload is checked by type before serialization instead
of scanning the written pickle, and listings reuse a cached index until a
file in the directory changes.
"""

from __future__ import annotations

import collections
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_kit.checkpoint import REGISTRY_NAME, CheckpointDirectory, load_checkpoint_file, save_checkpoint_file
from engine_kit.checkpoint import index, registry
from engine_kit.checkpoint.payload_types import check_payload_types
from engine_kit.errors import CheckpointWriteError
from tests.checkpoint.conftest import make_payload, payload_matches


def _commit(ckpts: CheckpointDirectory, step: int, **kwargs: object) -> str:
    name = ckpts.next_name(step)
    ckpts.commit(name, make_payload(step, numel=16), step=step, epoch=0, **kwargs)
    return name


def _reopen_warnings(folder: Path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CheckpointDirectory(folder).close()
    return [str(w.message) for w in caught]


# --- one index write per save, rotation after durability -----------------------


def test_commit_with_retag_and_rotation_writes_the_index_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        first = _commit(ckpts, 1, tags=("last",))
        writes: list[str] = []
        real = registry.atomic_write

        def counting(path: str, *args: object, **kwargs: object) -> None:
            writes.append(os.path.basename(path))
            real(path, *args, **kwargs)

        monkeypatch.setattr(registry, "atomic_write", counting)
        name = ckpts.next_name(2)
        ckpts.commit(name, make_payload(2, numel=16), step=2, epoch=0, tags=("last",), retag={name: ("last", "best")}, rotate_out=[first])
        monkeypatch.undo()
        assert writes == [REGISTRY_NAME]
        assert [(e.name, e.tags) for e in ckpts.entries()] == [(name, ("last", "best"))]
    assert not (tmp_path / first).exists()
    assert [(e.name, e.tags) for e in CheckpointDirectory(tmp_path, read_only=True).entries()] == [(name, ("last", "best"))]


def test_commit_refuses_bad_rotation_or_retag_before_writing(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        first = _commit(ckpts, 1)
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(ValueError, match="not a registered checkpoint"):
            ckpts.commit(ckpts.next_name(2), make_payload(2), step=2, epoch=0, rotate_out=["nope.ekpt"])
        with pytest.raises(ValueError, match="not registered checkpoints"):
            ckpts.commit(ckpts.next_name(2), make_payload(2), step=2, epoch=0, retag={"nope.ekpt": ("x",)})
        with pytest.raises(TypeError, match="must all be str"):
            ckpts.commit(ckpts.next_name(2), make_payload(2), step=2, epoch=0, retag={first: (1,)})
        assert sorted(os.listdir(tmp_path)) == before


def test_a_failed_directory_fsync_deletes_no_older_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine_kit.checkpoint import directory as directory_module

    with CheckpointDirectory(tmp_path) as ckpts:
        first = _commit(ckpts, 1)

        def failing(path: object) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(directory_module, "fsync_directory", failing)
        with pytest.raises(CheckpointWriteError, match="No older checkpoint was deleted"):
            _commit(ckpts, 2, rotate_out=[first])
    assert (tmp_path / first).exists()


# --- what a power loss can leave of an index that is not fsynced on its own ----------


def test_an_index_older_than_the_files_is_detected_and_the_newer_file_adopted(tmp_path: Path) -> None:
    """The index's rename was lost, the new file's was not (same directory fsync, other order)."""
    with CheckpointDirectory(tmp_path) as ckpts:
        first = _commit(ckpts, 1)
        old_index = (tmp_path / REGISTRY_NAME).read_bytes()
        second = _commit(ckpts, 2, rotate_out=[first])
    (tmp_path / REGISTRY_NAME).write_bytes(old_index)  # the stale index: lists only step 1, whose file is gone
    messages = _reopen_warnings(tmp_path)
    assert any("adopted verified files it did not list" in m and second in m for m in messages), messages
    reader = CheckpointDirectory(tmp_path, read_only=True)
    newest, payload = reader.load_newest_valid()
    assert newest.name == second and payload_matches(payload, 2)


def test_an_index_ahead_of_the_files_never_deletes_the_only_valid_checkpoint(tmp_path: Path) -> None:
    """The index's rename survived, the new file's did not: the rotated-out file must stay."""
    with CheckpointDirectory(tmp_path) as ckpts:
        first = _commit(ckpts, 1)
        kept_bytes = (tmp_path / first).read_bytes()
        second = _commit(ckpts, 2, rotate_out=[first])
    (tmp_path / second).unlink()  # lost with the power
    (tmp_path / first).write_bytes(kept_bytes)  # its unlink came after the directory fsync: never reached
    messages = _reopen_warnings(tmp_path)
    assert any("dropped entries for missing files" in m for m in messages), messages
    assert (tmp_path / first).read_bytes() == kept_bytes
    reader = CheckpointDirectory(tmp_path, read_only=True)
    newest, payload = reader.load_newest_valid()
    assert newest.name == first and payload_matches(payload, 1)


@pytest.mark.parametrize("content", [b"", b'{"format_version": 2, "entr'], ids=["empty", "torn"])
def test_an_index_whose_content_was_lost_is_rebuilt(tmp_path: Path, content: bytes) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        names = [_commit(ckpts, step) for step in (1, 2)]
    (tmp_path / REGISTRY_NAME).write_bytes(content)
    messages = _reopen_warnings(tmp_path)
    assert any("rebuilt the checkpoint index" in m for m in messages), messages
    assert [e.name for e in CheckpointDirectory(tmp_path, read_only=True).entries()] == names


# --- the index cache ------------------------------------------------------------------


def test_listings_reuse_the_index_until_the_directory_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine_kit.checkpoint import reader as reader_module

    loads = []
    real = index.load_index
    monkeypatch.setattr(reader_module, "load_index", lambda *a, **k: loads.append(1) or real(*a, **k))
    with CheckpointDirectory(tmp_path) as ckpts:
        for step in range(1, 4):
            old = [e.name for e in ckpts.entries()]
            ckpts.next_name(step)
            _commit(ckpts, step, rotate_out=old)
        saves_loads = len(loads)
        # Only the open reads the index: a commit's own writes and unlinks keep the cached one valid.
        assert saves_loads == 1
        ckpts.entries()
        ckpts.entries()
        assert len(loads) == saves_loads
        # Someone else drops a file in: the directory's mtime changes, the file is seen.
        other = CheckpointDirectory(tmp_path / "elsewhere")
        outsider = other.next_name(9)
        other.commit(outsider, make_payload(9, numel=16), step=9, epoch=0)
        other.close()
        os.replace(tmp_path / "elsewhere" / outsider, tmp_path / outsider)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert outsider in [e.name for e in ckpts.entries()]


def test_a_listed_file_truncated_in_place_invalidates_the_cache(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        first, second = _commit(ckpts, 1), _commit(ckpts, 2)
        assert len(ckpts.entries()) == 2
        with open(tmp_path / second, "r+b") as fileobj:
            fileobj.truncate(100)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert [e.name for e in ckpts.entries()] == [first]
        assert any("set aside" in str(w.message) for w in caught)


# --- the payload's types, checked before serialization ----------------------------------


def test_every_accepted_type_loads_back(tmp_path: Path) -> None:
    shared = [1, 2]
    payload = {
        "tensor": torch.arange(4.0),
        "parameter": torch.nn.Parameter(torch.ones(2)),
        "half": torch.ones(2, dtype=torch.bfloat16),
        "view": torch.arange(10)[2:5],
        "scalars": [1, 2.5, True, None, "s", b"b", bytearray(b"x"), complex(1, 2)],
        "torch_types": (torch.Size([2, 3]), torch.float16, torch.device("cpu")),
        "ordered": collections.OrderedDict(a=1),
        "counter": collections.Counter("aab"),
        "set": {1, 2},
        "nested": {(1, "k"): {"deep": [shared, shared]}},
    }
    check_payload_types(payload)
    save_checkpoint_file(tmp_path / "a.ekpt", payload)
    loaded = load_checkpoint_file(tmp_path / "a.ekpt")
    assert torch.equal(loaded["view"], torch.tensor([2, 3, 4])) and loaded["torch_types"][1] is torch.float16
    assert loaded["counter"] == collections.Counter("aab") and loaded["nested"][(1, "k")]["deep"] == [[1, 2], [1, 2]]


class _Custom:
    pass


@pytest.mark.parametrize(
    ("value", "where", "kind"),
    [
        ({"rng": np.random.get_state()}, r"payload\['rng'\]", "numpy"),
        ({"a": {"b": [1, _Custom()]}}, r"payload\['a'\]\['b'\]\[1\]", "_Custom"),
        ({"lock": threading.Lock()}, r"payload\['lock'\]", "lock"),
        ({"nt": collections.namedtuple("P", "x")(1)}, r"payload\['nt'\]", "P"),
        ({"sparse": torch.eye(2).to_sparse()}, r"payload\['sparse'\]", "sparse"),
        ({_Custom(): 1}, r"payload key", "_Custom"),
        ({"f": frozenset({1})}, r"payload\['f'\]", "frozenset"),
    ],
    ids=["numpy", "custom-class", "lock", "namedtuple", "sparse-tensor", "custom-key", "frozenset"],
)
def test_an_unloadable_payload_fails_at_save_naming_the_key(tmp_path: Path, value: dict, where: str, kind: str) -> None:
    with pytest.raises(CheckpointWriteError, match=rf"{where}.*{kind}.*Nothing was written\. To fix:"):
        save_checkpoint_file(tmp_path / "a.ekpt", value)
    assert os.listdir(tmp_path) == []


def test_a_self_referencing_payload_is_checked_without_recursion(tmp_path: Path) -> None:
    loop: list = []
    loop.append(loop)
    deep: list = []
    node = deep
    for _ in range(5000):
        node.append([])
        node = node[0]
    check_payload_types({"loop": loop, "deep": deep})


def test_a_rotation_save_costs_two_fsyncs_and_one_index_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole CheckpointRotation save, with a rotated-out file: file fsync, directory fsync, one registry rename."""
    import torch.nn.functional as F
    from ignite.engine import Events

    from engine_kit import create_trainer
    from handlers.checkpoint import CheckpointRotation
    from tests.helpers import mlp, regression_batches

    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss)
    rotation = CheckpointRotation(tmp_path, every_steps=None, at_epoch_end=True, keep_last=1)
    rotation.attach(trainer)
    trainer.run(regression_batches(4, 4), max_epochs=1)  # the first save; the run's end releases the lock
    rotation._open()  # reopened outside the measured save (the lock and the start-up repair have their own fsyncs)
    calls: list[str] = []
    for name in ("fsync", "replace"):
        monkeypatch.setattr(os, name, lambda *args, _real=getattr(os, name), _name=name: (calls.append(_name), _real(*args))[1])
    trainer.fire_event(Events.EPOCH_COMPLETED)  # one more epoch-end save: writes, rotates the first out
    rotation.flush()  # a background save (the default) is written on the writer thread: wait for it
    monkeypatch.undo()
    rotation.close()
    assert calls == ["fsync", "replace", "fsync"]  # the new file's content; the index; the directory, once for both
    assert len(CheckpointDirectory(tmp_path, read_only=True).entries()) == 1
