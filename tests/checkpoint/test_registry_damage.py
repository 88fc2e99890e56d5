"""The registry is an index: any damage to it is rebuilt from the files, never refused, never deleting.

Each case damages ``registry.json`` of a directory holding three verified
checkpoints, then checks that ``entries()`` lists exactly the three files
again (with their own steps), that the newest valid checkpoint is the real
newest, that one warning names the repair, and that every file is intact.
"Forged" edits re-seal the registry's own digest (someone who knows the
format); plain edits leave it stale, which alone triggers a rebuild.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from engine_kit.checkpoint import REGISTRY_NAME, CheckpointDirectory, RegistryEntry
from engine_kit.checkpoint import registry as registry_module
from tests.checkpoint.conftest import flip_byte, listing, make_payload, payload_matches


def _three_checkpoints(folder: Path) -> list[RegistryEntry]:
    with CheckpointDirectory(folder, run_id="run-a") as ckpts:
        for step in (10, 20, 30):
            ckpts.commit(ckpts.next_name(step), make_payload(step, numel=64), step=step, epoch=step // 20, metric=step / 10)
        return ckpts.entries()


def _checkpoint_files(folder: Path) -> dict[str, bytes]:
    """Every checkpoint file's bytes (what must survive any registry damage)."""
    return {name: data for name, data in listing(folder).items() if name.endswith(".ekpt")}


def _edit(folder: Path, change: Callable[[dict], None], *, reseal: bool) -> None:
    path = folder / REGISTRY_NAME
    document = json.loads(path.read_text())
    change(document)
    if reseal:
        document["digest"] = registry_module._content_digest(document)
    path.write_text(json.dumps(document))


def _swap_names(document: dict) -> None:
    first, last = document["entries"][0], document["entries"][-1]
    first["name"], last["name"] = last["name"], first["name"]


def _set(index: int, key: str, value: object) -> Callable[[dict], None]:
    return lambda document: document["entries"][index].__setitem__(key, value)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "flipped-byte": lambda folder: flip_byte(folder / REGISTRY_NAME, (folder / REGISTRY_NAME).stat().st_size // 2),
    "empty": lambda folder: (folder / REGISTRY_NAME).write_bytes(b""),
    "deleted": lambda folder: (folder / REGISTRY_NAME).unlink(),
    "not-json": lambda folder: (folder / REGISTRY_NAME).write_text("{'entries': ["),
    "swapped-names": lambda folder: _edit(folder, _swap_names, reseal=False),
    "swapped-names-forged": lambda folder: _edit(folder, _swap_names, reseal=True),
    "edited-digest": lambda folder: _edit(folder, _set(2, "sha256", "0" * 64), reseal=False),
    "edited-step": lambda folder: _edit(folder, _set(0, "step", 999), reseal=False),
    "edited-step-forged": lambda folder: _edit(folder, _set(0, "step", 999), reseal=True),
    "entry-for-missing-file-forged": lambda folder: _edit(
        folder, lambda d: d["entries"].append({**d["entries"][0], "name": "step00000040-00009.ekpt", "step": 40}), reseal=True
    ),
    "verified-file-unlisted-forged": lambda folder: _edit(folder, lambda d: d["entries"].pop(), reseal=True),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_registry_is_rebuilt_from_the_files(tmp_path: Path, damage: str) -> None:
    original = _three_checkpoints(tmp_path)
    files = _checkpoint_files(tmp_path)
    DAMAGE[damage](tmp_path)

    with pytest.warns(UserWarning, match="rebuilt the checkpoint index") as record:
        reader = CheckpointDirectory(tmp_path, read_only=True)
        entries = reader.entries()
        newest, payload = reader.load_newest_valid()
    assert len([w for w in record if "rebuilt the checkpoint index" in str(w.message)]) == 1
    assert [(e.name, e.step, e.order, e.sha256) for e in entries] == [(e.name, e.step, e.order, e.sha256) for e in original]
    assert newest.name == original[-1].name and payload_matches(payload, 30)

    # A writer persists the rebuilt index: the next reader sees a clean one.
    with pytest.warns(UserWarning, match="rebuilt the checkpoint index"):
        CheckpointDirectory(tmp_path).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CheckpointDirectory(tmp_path, read_only=True).entries() == original
    assert _checkpoint_files(tmp_path) == files


def test_forged_digest_of_a_listed_file_is_corrected_from_the_file(tmp_path: Path) -> None:
    """A re-sealed registry with a wrong sha256: the file verifies, so the file wins."""
    original = _three_checkpoints(tmp_path)
    _edit(tmp_path, _set(2, "sha256", "0" * 64), reseal=True)
    with CheckpointDirectory(tmp_path) as ckpts:
        with pytest.warns(UserWarning, match="verifies but the index recorded sha256 000000000000"):
            assert ckpts.newest_valid() == original[-1]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ckpts.entries() == original and ckpts.newest_valid() == original[-1]


def test_rerun_after_registry_loss_never_reuses_a_name(tmp_path: Path) -> None:
    original = _three_checkpoints(tmp_path)
    files = _checkpoint_files(tmp_path)
    (tmp_path / REGISTRY_NAME).unlink()
    with pytest.warns(UserWarning, match="was missing"):
        ckpts = CheckpointDirectory(tmp_path, run_id="run-b")
    with ckpts:
        # A rerun from step 0 asks for names of steps the old run already saved.
        names = {ckpts.next_name(step) for step in (10, 20, 30)}
        assert not names & {e.name for e in original}
        new = ckpts.commit(ckpts.next_name(10), make_payload(11, numel=64), step=10, epoch=0)
        assert new.order == 4 and new.run_id == "run-b"
        assert ckpts.next_name(10) != new.name
    assert {name: data for name, data in _checkpoint_files(tmp_path).items() if name in files} == files


def test_commit_refuses_every_existing_name(tmp_path: Path) -> None:
    from engine_kit.errors import CheckpointExistsError

    original = _three_checkpoints(tmp_path)
    (tmp_path / "copied.ekpt").write_bytes((tmp_path / original[0].name).read_bytes())
    (tmp_path / "folder.ekpt").mkdir()
    files = _checkpoint_files(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the copy and the folder are set aside
        ckpts = CheckpointDirectory(tmp_path)
    with ckpts:
        for name in (original[0].name, "copied.ekpt"):
            with pytest.raises(CheckpointExistsError, match="never"):
                ckpts.commit(name, make_payload(1, numel=4), step=1, epoch=0)
        with pytest.raises(CheckpointExistsError, match="a directory already exists") as info:
            ckpts.commit("folder.ekpt", make_payload(1, numel=4), step=1, epoch=0)
        assert "disk space" not in str(info.value)
        assert "copied.ekpt" in ckpts.excluded_files() and "folder.ekpt" in ckpts.excluded_files()
        # Rotation can only remove what the index holds.
        with pytest.raises(ValueError, match="not a registered"):
            ckpts.remove(["copied.ekpt"])
    assert _checkpoint_files(tmp_path) == files and (tmp_path / "folder.ekpt").is_dir()


def test_unlisted_file_of_another_run_is_set_aside_when_a_run_id_is_given(tmp_path: Path) -> None:
    original = _three_checkpoints(tmp_path)  # written by run-a
    (tmp_path / REGISTRY_NAME).unlink()
    with pytest.warns(UserWarning, match="belongs to run 'run-a', not 'run-b'"):
        ckpts = CheckpointDirectory(tmp_path, run_id="run-b")
    with ckpts:
        assert ckpts.entries() == [] and sorted(ckpts.excluded_files()) == [e.name for e in original]
        assert ckpts.next_name(1).endswith("-00004.ekpt")
    with pytest.warns(UserWarning, match="adopted verified files"):
        assert CheckpointDirectory(tmp_path, read_only=True, run_id="run-a").entries() == original


def test_set_aside_moves_newer_checkpoints_out_of_the_index(tmp_path: Path) -> None:
    original = _three_checkpoints(tmp_path)
    data = {e.name: (tmp_path / e.name).read_bytes() for e in original}
    with CheckpointDirectory(tmp_path) as ckpts:
        moved = ckpts.set_aside([e.name for e in original[1:]], "branched-from-step00000010")
        assert ckpts.entries() == original[:1]
        assert ckpts.next_name(20).endswith("-00004.ekpt")  # the moved names stay retired
    for path in moved:
        assert Path(path).read_bytes() == data[Path(path).name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the subfolder is not looked into
        assert CheckpointDirectory(tmp_path, read_only=True).entries() == original[:1]


def test_a_read_only_rebuild_verifies_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine_kit.checkpoint import index as index_module

    original = _three_checkpoints(tmp_path)
    (tmp_path / "stray.ekpt").write_bytes(b"junk")
    (tmp_path / REGISTRY_NAME).unlink()
    verified: list[str] = []
    real = index_module.verify_checkpoint_file
    monkeypatch.setattr(index_module, "verify_checkpoint_file", lambda path: verified.append(Path(path).name) or real(path))
    reader = CheckpointDirectory(tmp_path, read_only=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(4):
            assert reader.entries() == original
    assert sorted(verified) == sorted([e.name for e in original] + ["stray.ekpt"])
    assert len(record) == 1  # one warning, however often the reader lists
    (tmp_path / original[0].name).write_bytes(b"changed")  # a changed file is judged again
    with pytest.warns(UserWarning, match="set aside"):
        assert reader.entries() == original[1:]


def test_a_listing_answers_even_when_the_repaired_index_cannot_be_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine_kit.checkpoint import reader as reader_module
    from engine_kit.errors import CheckpointWriteError

    original = _three_checkpoints(tmp_path)
    with CheckpointDirectory(tmp_path) as ckpts:
        (tmp_path / REGISTRY_NAME).write_bytes(b"")

        def disk_full(*args: object, **kwargs: object) -> None:
            raise CheckpointWriteError("No space left on device while writing registry.json")

        monkeypatch.setattr(reader_module, "write_registry", disk_full)
        with pytest.warns(UserWarning, match=r"in memory \(saving it failed: No space left"):
            assert ckpts.entries() == original and ckpts.newest_valid() == original[-1]
        with pytest.raises(CheckpointWriteError, match="No space left"):
            ckpts.repair()  # an explicit repair says it could not save
        with pytest.raises(CheckpointWriteError, match="No space left"):
            ckpts.commit(ckpts.next_name(40), make_payload(40, numel=4), step=40, epoch=2)
    assert _checkpoint_files(tmp_path).keys() == {e.name for e in original}


def test_the_registry_is_written_as_one_compact_line_and_an_indented_one_still_reads(tmp_path: Path) -> None:
    original = _three_checkpoints(tmp_path)
    raw = (tmp_path / REGISTRY_NAME).read_bytes()
    document = json.loads(raw)
    assert b"\n" not in raw and b", " not in raw and list(document)[-1] == "digest"
    assert document["digest"] == registry_module._content_digest(document)
    (tmp_path / REGISTRY_NAME).write_text(json.dumps(document, indent=1))  # the same index, spread out as before
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no repair: the digest covers the content, not its layout
        assert CheckpointDirectory(tmp_path, read_only=True).entries() == original


def test_non_ascii_tags_and_non_finite_metrics_keep_the_digest_valid(tmp_path: Path) -> None:
    entries = [
        RegistryEntry("step00000001-00001.ekpt", "a" * 64, 10, 1, 0, ("bést", "最後"), float("nan"), 1.5, 1, "run-é"),
        RegistryEntry("step00000002-00002.ekpt", "b" * 64, 10, 2, 0, (), float("-inf"), 2.25, 2, None),
    ]
    registry_module.write_registry(tmp_path, entries, ["step00000000-00000.ekpt"], set_aside={"x.ekpt": {"reason": "ü", "size": 1}}, next_order=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        contents = registry_module.read_registry(tmp_path)
    assert [entry.name for entry in contents.entries] == [entry.name for entry in entries]
    assert contents.entries[0].tags == ("bést", "最後") and contents.entries[1].metric == float("-inf")
    assert contents.pending == ["step00000000-00000.ekpt"] and contents.set_aside == {"x.ekpt": {"reason": "ü", "size": 1}}
    assert contents.next_order == 7
