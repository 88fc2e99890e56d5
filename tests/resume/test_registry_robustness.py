"""A damaged checkpoint index never stops a resume nor costs a verified file; an explicit resume deletes nothing.

For each damage (a flipped byte, an empty file, a deleted file, two names
swapped, an edited digest, an edited step) a run "crashes" (an exception at
iteration 17: checkpoints at steps 4, 8, 12 and 16 on disk), its ``registry.json``
is damaged, and the rerun with ``resume="auto"``:

* resumes from the newest checkpoint that verifies (step 16),
* ends bitwise equal to the uninterrupted run (losses, parameters, optimizer),
* leaves every file that verified before it on disk, byte for byte (rotation
  keeps 100 here, so the policy itself deletes nothing).

Resuming with ``resume=<an older file>`` of a finished or a crashed run moves
every newer checkpoint into a ``branched-from-step...`` subfolder: all stay on
disk, byte for byte, and the branch itself ends equal to the uninterrupted run.

The runs are in-process (tests/resume/train_script.py's ``train``): about a
second each.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from ignite.engine import Events

from engine_kit.checkpoint import verify_checkpoint_file
from engine_kit.errors import HandlerError
from tests.resume.train_script import train

KEEP = 100
CRASH_AT = 17
EVERY = 4


class SimulatedCrash(Exception):
    """Stands for a kill: raised from a handler, nothing after it runs."""


def crash(trainer) -> None:
    def boom(engine):
        if engine.state.iteration == CRASH_AT:
            raise SimulatedCrash(f"crash at iteration {CRASH_AT}")

    trainer.add_event_handler(Events.ITERATION_COMPLETED, boom)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return train(tmp_path_factory.mktemp("reference"), keep_last=KEEP, every_steps=EVERY)


def crashed_run(run_dir: Path) -> dict[str, bytes]:
    with pytest.raises(HandlerError, match="crash at iteration"):
        train(run_dir, keep_last=KEEP, every_steps=EVERY, hooks=[crash])
    files = {}
    for path in sorted(run_dir.glob("*.ekpt")):
        verify_checkpoint_file(path)  # every one verifies
        files[path.name] = path.read_bytes()
    assert len(files) == 4  # steps 4, 8, 12, 16
    return files


def _document(run_dir: Path) -> dict:
    return json.loads((run_dir / "registry.json").read_text())


def _write(run_dir: Path, document: dict) -> None:
    (run_dir / "registry.json").write_text(json.dumps(document))


def flip_a_byte(run_dir: Path) -> None:
    data = bytearray((run_dir / "registry.json").read_bytes())
    data[len(data) // 2] ^= 0x20
    (run_dir / "registry.json").write_bytes(bytes(data))


def empty(run_dir: Path) -> None:
    (run_dir / "registry.json").write_bytes(b"")


def delete(run_dir: Path) -> None:
    (run_dir / "registry.json").unlink()


def swap_names(run_dir: Path) -> None:
    document = _document(run_dir)
    entries = sorted(document["entries"], key=lambda e: e["step"])
    entries[-1]["name"], entries[0]["name"] = entries[0]["name"], entries[-1]["name"]
    _write(run_dir, document)


def edit_digest(run_dir: Path) -> None:
    document = _document(run_dir)
    newest = max(document["entries"], key=lambda e: e["step"])
    newest["sha256"] = "0" * 64
    _write(run_dir, document)


def edit_step(run_dir: Path) -> None:
    document = _document(run_dir)
    oldest = min(document["entries"], key=lambda e: e["step"])
    oldest["step"] = 10_000  # would make the oldest look newest
    _write(run_dir, document)


DAMAGES = {f.__name__: f for f in (flip_a_byte, empty, delete, swap_names, edit_digest, edit_step)}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_index_resumes_from_the_newest_verified_checkpoint_and_loses_nothing(tmp_path, reference, damage):
    run_dir = tmp_path / "ckpt"
    before = crashed_run(run_dir)
    newest = max(before, key=lambda name: int(name[4:12]))  # stepNNNNNNNN-...
    DAMAGES[damage](run_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(run_dir, keep_last=KEEP, every_steps=EVERY, resume="auto")
    assert Path(result["resumed_from"]).name == newest, [str(w.message) for w in caught]
    for key in ("losses", "params", "optimizer", "scheduler", "lr", "optimizer_steps"):
        assert result[key] == reference[key], key
    for name, data in before.items():
        assert (run_dir / name).read_bytes() == data, f"{name} was lost or changed"
    assert any("rebuilt" in str(w.message) or "repair" in str(w.message) for w in caught), "the repair was silent"


def test_a_fresh_run_into_a_directory_with_checkpoints_is_refused_and_deletes_nothing(tmp_path):
    from engine_kit.errors import CheckpointDirectoryNotEmptyError

    run_dir = tmp_path / "ckpt"
    before = crashed_run(run_dir)
    delete(run_dir)  # even without an index, the files are recognised
    with pytest.raises(CheckpointDirectoryNotEmptyError, match="resume='auto'"):
        train(run_dir, keep_last=KEEP, every_steps=EVERY)
    assert {p.name: p.read_bytes() for p in run_dir.glob("*.ekpt")} == before


# -- explicit resume from an older file: a branch that deletes nothing --------------------------------------
def all_files(run_dir: Path) -> dict[str, bytes]:
    """Every checkpoint file under the directory, wherever the branch put it, by file name."""
    return {p.name: p.read_bytes() for p in run_dir.rglob("*.ekpt")}


@pytest.mark.parametrize("history", ["finished", "crashed"])
def test_resuming_from_an_older_file_keeps_every_newer_checkpoint(tmp_path, reference, history):
    run_dir = tmp_path / "ckpt"
    if history == "finished":
        train(run_dir, keep_last=3, every_steps=EVERY)  # keeps steps 28, 32, 36
    else:
        with pytest.raises(HandlerError, match="crash at iteration"):
            train(run_dir, keep_last=3, every_steps=EVERY, hooks=[crash])  # keeps steps 8, 12, 16
    before = all_files(run_dir)
    oldest = min(before, key=lambda name: int(name[4:12]))
    with pytest.warns(UserWarning, match="moved \\(not deleted\\)"):
        result = train(run_dir, keep_last=3, every_steps=EVERY, resume=run_dir / oldest)
    assert Path(result["resumed_from"]).name == oldest
    after = all_files(run_dir)
    newer = {name: data for name, data in before.items() if name != oldest}
    assert len(newer) == 2
    for name, data in newer.items():
        assert after.get(name) == data, f"{name} was lost or changed"
    # The resumed-from file itself is an ordinary member of the new rotation. The branch is an exact continuation of the file it started from.
    for key in ("losses", "params", "optimizer", "optimizer_steps"):
        assert result[key] == reference[key], key
