"""Async saves write the same checkpoints as synchronous ones, and every one of them verifies.

Two runs of ``tests/resume/train_script.py`` (two epochs, 24 optimizer steps,
a save every 2, keep-last 2: 12 saves, 10 of them later rotated out), one with
``CheckpointRotation(async_save=True)``, one with ``async_save=False``. A
``CHECKPOINT_SAVED`` handler copies each file aside the moment it is
announced durable, so every save is compared, not just the two kept. Per
step, the ``torch.save`` archives are byte-identical member by member once
the two things that must differ are set equal: the run's identity
(``run_id``) and the save time (``meta.created``). Only torch's
``serialization_id`` member is skipped: torch computes it from the other
members' bytes. The tensors are equal bit for bit, and the files' records
agree too.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from engine_kit import StepEvents
from engine_kit.checkpoint import load_checkpoint_file
from engine_kit.checkpoint.seal import open_checkpoint, read_seal
from engine_kit.cli import main as engine_kit_cli
from tests.helpers import assert_same
from tests.resume.train_script import train

ROOT = Path(__file__).resolve().parents[2]


def run_keeping_every_save(folder: Path, *, async_save: bool) -> tuple[Path, list[Path]]:
    """Train; return the checkpoint directory and a copy of every checkpoint, taken when it was announced."""
    aside = folder / "every-save"
    aside.mkdir(parents=True)
    copies: list[Path] = []

    def copy(engine: object) -> None:
        source = Path(engine.state.last_checkpoint)
        assert source.is_file(), "CHECKPOINT_SAVED before the file was there"
        copies.append(Path(shutil.copy2(source, aside / source.name)))

    hooks = [lambda trainer: trainer.add_event_handler(StepEvents.CHECKPOINT_SAVED, copy)]
    train(folder / "ckpt", epochs=2, every_steps=2, keep_last=2, async_save=async_save, hooks=hooks)
    return folder / "ckpt", copies


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    base = tmp_path_factory.mktemp("same-files")
    return {mode: run_keeping_every_save(base / mode, async_save=mode == "async") for mode in ("sync", "async")}


def split(path: Path) -> tuple[dict[str, bytes], dict]:
    """A checkpoint's ``torch.save`` archive as {member: bytes}, and its sealed record."""
    fileobj, size = open_checkpoint(str(path))
    with fileobj:
        seal = read_seal(str(path), fileobj, size)
        fileobj.seek(0)
        archive = fileobj.read(seal.archive_length)
        record = json.loads(fileobj.read(seal.record_length))
    with zipfile.ZipFile(io.BytesIO(archive)) as members:
        return {info.filename: members.read(info) for info in members.infolist()}, record


def test_every_async_checkpoint_verifies(runs):
    folder, copies = runs["async"]
    cli = [str(Path(sys.executable).parent / "engine-kit"), "ckpt", "verify", str(folder)]
    if not os.path.exists(cli[0]):
        cli = [sys.executable, "-m", "engine_kit.cli", "ckpt", "verify", str(folder)]
    verified = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert len(copies) == 12 and len(list(folder.glob("*.ekpt"))) == 2  # 10 rotated out along the way
    # The rotated-out ones, as copied when they were announced: each verifies alone, away from its index.
    for copy in copies:
        assert engine_kit_cli(["ckpt", "verify", str(copy)]) == 0, copy


def test_async_checkpoints_hold_the_same_bytes_as_synchronous_ones(runs):
    sync_copies, async_copies = runs["sync"][1], runs["async"][1]
    assert [p.name.split("-")[0] for p in async_copies] == [p.name.split("-")[0] for p in sync_copies]
    assert len(async_copies) == 12
    for sync_path, async_path in zip(sync_copies, async_copies):
        sync_members, sync_record = split(sync_path)
        async_members, async_record = split(async_path)
        # The records agree but for who wrote them and when.
        for record in (sync_record, async_record):
            record.pop("run_id"), record.pop("created")
        assert async_record == sync_record, async_path.name
        sync_payload, async_payload = load_checkpoint_file(sync_path), load_checkpoint_file(async_path)
        identity = {
            async_payload["stateful"]["checkpoint_rotation"]["run_id"].encode(): sync_payload["stateful"]["checkpoint_rotation"]["run_id"].encode(),
            struct.pack(">d", async_payload["meta"]["created"]): struct.pack(">d", sync_payload["meta"]["created"]),
        }
        assert async_members.keys() == sync_members.keys(), async_path.name
        for member, data in async_members.items():
            if member.endswith(".data/serialization_id"):
                continue  # torch derives it from the other members' bytes (so from run_id and time too)
            if member.endswith("data.pkl"):
                for theirs, ours in identity.items():
                    assert data.count(theirs) == 1, f"{member}: the run id / save time is not where expected"
                    data = data.replace(theirs, ours)
            assert data == sync_members[member], f"{async_path.name}: archive member {member} differs"
        # And as loaded: every tensor equal bit for bit, everything else equal.
        for payload in (sync_payload, async_payload):
            payload["stateful"]["checkpoint_rotation"].pop("run_id"), payload["meta"].pop("created")
        assert_same(async_payload, sync_payload)
        assert any(isinstance(t, torch.Tensor) for t in async_payload["model"].values())
