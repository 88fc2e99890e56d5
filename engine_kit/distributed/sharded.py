"""Sharded checkpoints (FSDP2): every rank writes its part, one atomic commit, every file verified.

An FSDP2 (``fully_shard``) model holds only a shard of each parameter on each
rank, so a rank-0-only save cannot capture it. Here every rank writes its
shards with ``torch.distributed.checkpoint`` (DCP), and engine_kit adds what
DCP lacks: an atomic commit and an integrity check of every file.

Layout of a committed checkpoint directory ``NAME/``::

    .metadata, __0_0.distcp, __1_0.distcp, ...   DCP's files, one or more per rank
    extra.ekpt       rank 0's non-sharded state (a sealed engine_kit file)
    MANIFEST.json    written last: size and SHA-256 of every other file

Write: rank 0 creates ``.NAME.partial-<token>`` next to ``NAME``; every rank
writes its shards into it (DCP fsyncs them); rank 0 hashes every file, writes
the manifest (fsynced), renames the directory to ``NAME`` and fsyncs the
parent. The rename is the commit: a kill at any moment leaves either no
``NAME`` or a complete, verifiable one; partial directories are swept at the
next save. Read: rank 0 verifies every file against the manifest, then every
rank loads its part (DCP reshards if needed).

:func:`newest_valid_sharded` picks the checkpoint to resume from (falling
back past corrupt ones) and :func:`keep_newest_sharded` rotates. The
directory must be shared by all ranks (see ``shared_dir``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from engine_kit.checkpoint import fsync_directory, load_checkpoint_file, save_checkpoint_file, sha256_file
from engine_kit.distributed.agreement import agree, decide, rank
from engine_kit.errors import CheckpointCorruptError, fix_message

MANIFEST = "MANIFEST.json"
EXTRA = "extra.ekpt"
PARTIAL = ".partial-"


def is_sharded(model: torch.nn.Module) -> bool:
    """True when ``model`` holds sharded parameters (DTensors: FSDP2's ``fully_shard``, tensor parallel).

    >>> is_sharded(torch.nn.Linear(2, 1))
    False
    """
    return any(isinstance(p, DTensor) for p in model.parameters())


def refuse_sharded_model(model: torch.nn.Module) -> None:
    """Raise a TypeError naming FSDP2 when ``model`` is sharded: a rank-0 file cannot hold it."""
    if is_sharded(model):
        problem = (
            f"the model ({type(model).__name__}) is sharded (FSDP2 fully_shard: its parameters are DTensors), so "
            "rank 0 alone cannot save it and CheckpointRotation's single-file checkpoints cannot hold it."
        )
        fix = (
            "save and resume it with engine_kit.distributed.sharded: save_sharded(path, capture_sharded(model, "
            "optimizer), extra) on every rank, load_sharded + apply_sharded to resume; or train it unsharded (DDP)."
        )
        raise TypeError(fix_message(problem, fix))


def capture_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's and optimizer's state as DCP sees them (each rank its own shards)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def apply_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load :func:`capture_sharded`'s structure, filled by :func:`load_sharded`, into the live objects."""
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _sweep_partials(parent: str) -> None:
    """Delete what interrupted saves and deletions left (only rank 0 writes here, and not at this moment)."""
    for entry in os.listdir(parent):
        if entry.startswith(".") and PARTIAL in entry:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _prepare(path: str) -> str:
    parent, name = os.path.split(path)
    if os.path.lexists(path):
        problem = f"{path!r} already exists; committed checkpoints are never overwritten."
        raise FileExistsError(fix_message(problem, "save under a new name (a per-step name)."))
    os.makedirs(parent, exist_ok=True)
    _sweep_partials(parent)
    partial = os.path.join(parent, f".{name}{PARTIAL}{secrets.token_hex(6)}")
    os.mkdir(partial)
    return partial


def _files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n != MANIFEST)


def _commit(partial: str, path: str, extra: dict[str, Any]) -> None:
    save_checkpoint_file(os.path.join(partial, EXTRA), extra)
    files = {n: {"size": os.path.getsize(os.path.join(partial, n)), "sha256": sha256_file(os.path.join(partial, n))} for n in _files(partial)}
    manifest = os.path.join(partial, MANIFEST)
    with open(manifest, "w") as f:
        json.dump({"format": "engine_kit-sharded-1", "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_directory(partial)
    os.rename(partial, path)  # the commit
    fsync_directory(os.path.dirname(path))


def save_sharded(path: str | os.PathLike[str], sharded: dict[str, Any], extra: dict[str, Any]) -> None:
    """Write a sharded checkpoint to the new directory ``path`` (a collective: call it on every rank).

    Args:
        path: the checkpoint directory to create (must not exist), on storage every rank shares.
        sharded: this rank's DCP state (e.g. :func:`capture_sharded`'s value).
        extra: rank 0's other state (counters, handlers, per-rank RNG), tensors and primitives only.

    Raises:
        RankAgreementError: on every rank, when any rank failed; nothing is committed.
    """
    path = os.path.abspath(os.fspath(path))
    partial = decide(f"prepare the sharded checkpoint {path!r}", lambda: _prepare(path))
    agree(f"write the shards of {path!r}", lambda: dcp.save(sharded, checkpoint_id=partial))
    agree(f"commit {path!r}", lambda: _commit(partial, path, extra) if rank() == 0 else None)


def verify_sharded(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a committed sharded checkpoint: the manifest, then every file's size and SHA-256.

    Returns:
        The manifest.

    Raises:
        CheckpointCorruptError: no manifest (never committed), a missing, extra,
            truncated or altered file; the message names it.
    """
    path = os.fspath(path)
    fix = "fall back to an older checkpoint."
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
        listed = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointCorruptError(fix_message(f"{path!r} is not a committed sharded checkpoint: {exc!r}.", fix)) from exc
    present = _files(path)
    if sorted(listed) != present:
        problem = f"{path!r} holds files {present}, its manifest lists {sorted(listed)}."
        raise CheckpointCorruptError(fix_message(problem, fix))
    for name, expected in listed.items():
        file = os.path.join(path, name)
        if os.path.getsize(file) != expected["size"] or sha256_file(file) != expected["sha256"]:
            problem = f"{file!r} differs from the size/SHA-256 its manifest recorded (truncated or altered)."
            raise CheckpointCorruptError(fix_message(problem, fix))
    return manifest


def newest_valid_sharded(parent: str | os.PathLike[str], prefix: str = "") -> str | None:
    """Rank 0's choice, on every rank: the newest committed sharded checkpoint in ``parent`` that verifies.

    Candidates are the directories named ``prefix...`` holding a manifest,
    newest name last (use zero-padded step numbers); corrupt ones are skipped
    with one warning. A collective.
    """

    def choose() -> str | None:
        parent_path = os.fspath(parent)
        if not os.path.isdir(parent_path):
            return None
        names = sorted(n for n in os.listdir(parent_path) if n.startswith(prefix) and os.path.isfile(os.path.join(parent_path, n, MANIFEST)))
        skipped = []
        for name in reversed(names):
            try:
                verify_sharded(os.path.join(parent_path, name))
            except CheckpointCorruptError as exc:
                skipped.append(f"{name} ({str(exc).split(' To fix:')[0]})")
                continue
            if skipped:
                warnings.warn(f"engine_kit: skipped corrupt sharded checkpoint(s) {'; '.join(skipped)}; using {name}.", stacklevel=3)
            return os.path.abspath(os.path.join(parent_path, name))
        if skipped:
            warnings.warn(f"engine_kit: skipped corrupt sharded checkpoint(s) {'; '.join(skipped)}; none is left.", stacklevel=3)
        return None

    return decide(f"choose the newest sharded checkpoint in {os.fspath(parent)!r}", choose)


def keep_newest_sharded(parent: str | os.PathLike[str], keep_last: int, prefix: str = "") -> list[str]:
    """Rotation: delete all but the ``keep_last`` newest committed checkpoints ``prefix...`` (a collective).

    Each is first renamed to a hidden partial name (one atomic step that
    un-commits it), then deleted, so a kill in between never leaves a
    half-deleted directory under a committed name. Returns the names deleted.
    """
    if keep_last < 1:
        raise ValueError(fix_message(f"keep_last={keep_last!r} would delete every checkpoint.", "pass keep_last >= 1."))

    def rotate() -> list[str]:
        parent_path = os.fspath(parent)
        names = sorted(n for n in os.listdir(parent_path) if n.startswith(prefix) and os.path.isfile(os.path.join(parent_path, n, MANIFEST)))
        dropped = names[: max(0, len(names) - keep_last)]
        for name in dropped:
            doomed = os.path.join(parent_path, f".{name}{PARTIAL}deleted-{secrets.token_hex(4)}")
            os.rename(os.path.join(parent_path, name), doomed)
            fsync_directory(parent_path)
            shutil.rmtree(doomed)
        return dropped

    return decide(f"rotate the sharded checkpoints in {os.fspath(parent)!r}", rotate)


def load_sharded(path: str | os.PathLike[str], sharded: dict[str, Any]) -> dict[str, Any]:
    """Verify ``path`` (on rank 0), fill ``sharded`` in place on every rank, return the extra state.

    A collective. ``sharded`` has the live structure (:func:`capture_sharded`);
    afterwards pass it to :func:`apply_sharded`.

    Raises:
        RankAgreementError: on every rank, when verification or loading failed
            anywhere; the live objects are untouched.
    """
    path = os.path.abspath(os.fspath(path))
    decide(f"verify the sharded checkpoint {path!r}", lambda: verify_sharded(path))
    agree(f"load the shards of {path!r}", lambda: dcp.load(sharded, checkpoint_id=path))
    return agree(f"load {EXTRA} of {path!r}", lambda: load_checkpoint_file(os.path.join(path, EXTRA)))
