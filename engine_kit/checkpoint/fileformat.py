"""One checkpoint file: ``torch.save`` bytes and a self-description, sealed with SHA-256.

A ``.ekpt`` file is the ``torch.save`` zip archive, then its record
(:class:`~engine_kit.checkpoint.record.CheckpointRecord`: name, step, epoch,
metric, tags, creation order, run identity, time), then a trailer holding
the SHA-256 of both (layout in :mod:`engine_kit.checkpoint.seal`). The
record lies inside what the digest covers, so a file describes itself and a
directory's index can be rebuilt from its files. Files of format 1 (no
record) still verify and load.

The trailer makes a file verify on its own, copied away from its directory:
an empty or truncated file has no trailer (or one whose lengths disagree),
and any altered byte breaks the digest. ``torch.load`` never checks the
zip's CRC-32s, so without the trailer a flipped byte inside tensor data
would load silently. The digest is for integrity only (anyone can recompute
it); safety against code in the pickle comes from
:mod:`engine_kit.checkpoint.safety` plus ``weights_only=True``.

:func:`verify_checkpoint_file` streams: constant memory whatever the file's
size (the digest in 1 MiB chunks, the archive checked by
:func:`~engine_kit.checkpoint.archive.check_archive` without reading tensor
data). :func:`load_checkpoint_file` holds the bytes it hashed in memory and
loads exactly those. Only regular files are opened, without ever blocking.
Every failure is a :class:`~engine_kit.errors.CheckpointCorruptError` (for a
FIFO, directory or device, its subclass ``NotARegularFileError``) with a
one-line reason.

>>> import tempfile, pathlib, torch
>>> path = pathlib.Path(tempfile.mkdtemp()) / "a.ekpt"
>>> info = save_checkpoint_file(path, {"w": torch.ones(2)}, record=CheckpointRecord("a.ekpt", step=3, epoch=1, order=1))
>>> load_checkpoint_file(path)["w"]
tensor([1., 1.])
>>> verify_checkpoint_file(path).record.step, read_record(path).epoch
(3, 1)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
from collections.abc import Callable
from typing import IO, Any

import torch

from engine_kit.checkpoint import streaming
from engine_kit.checkpoint.archive import check_archive
from engine_kit.checkpoint.atomic import atomic_write
from engine_kit.checkpoint.payload_types import check_payload_types
from engine_kit.checkpoint.record import CheckpointRecord
from engine_kit.checkpoint.regular import open_regular
from engine_kit.checkpoint.safety import weights_only_env_conflict
from engine_kit.checkpoint.serialized import SerializedPayload
from engine_kit.checkpoint.seal import (  # noqa: F401  (MAGIC..make_trailer, read_record, sha256_file: re-exported)
    CHUNK,
    MAGIC,
    MAGIC_V2,
    TRAILER_SIZE,
    TRAILER_V2_SIZE,
    corrupt,
    digest_mismatch,
    make_trailer,
    open_checkpoint,
    parse_record,
    read_record,
    read_seal,
    read_sealed,
    sha256_file,
    stream_digest,
    trailer_v2,
)
from engine_kit.errors import CheckpointCorruptError, CheckpointError, CheckpointWriteError, fix_message



@dataclasses.dataclass(frozen=True)
class CheckpointFileInfo:
    """What saving or verifying learned about a sound file.

    Attributes:
        path: the file.
        size_bytes: its size, trailer included.
        sha256: hex SHA-256 of the whole file (what the index records).
        meta: the payload's ``"meta"`` dict when the payload was at hand
            (saving); ``None`` after :func:`verify_checkpoint_file`, which
            does not unpickle the payload.
        record: the file's sealed self-description (``None`` for format 1).
    """

    path: str
    size_bytes: int
    sha256: str
    meta: dict[str, Any] | None
    record: CheckpointRecord | None = None


def save_checkpoint_file(
    path: str | os.PathLike[str],
    payload: dict[str, Any] | SerializedPayload,
    *,
    record: CheckpointRecord | None = None,
    replace: bool = True,
    sync_directory: bool = True,
    on_serialized: Callable[[], None] | None = None,
) -> CheckpointFileInfo:
    """Serialize ``payload``, seal it with ``record`` and write it atomically.

    The payload's types are checked against the load-time allow-list
    (:func:`~engine_kit.checkpoint.payload_types.check_payload_types`)
    before anything is serialized, so a payload that could never be loaded
    safely (a numpy array, a custom class) fails now, naming the key, not at
    resume time. The written pickle is scanned when it is loaded.

    Args:
        path: the final file name (its directory must exist).
        payload: a dict of tensors, numbers, strings and containers of them,
            or its archive from :func:`~engine_kit.checkpoint.serialized.serialize_small`
            (its types were checked there).
        record: the file's self-description; default: its name, step 0.
        replace: False refuses (``CheckpointExistsError``) when something
            already sits at ``path``, even if it appears during the write.
        sync_directory: fsync the directory after the rename. A caller that
            renames more into the same directory (the index) passes False
            and fsyncs the directory once for both.
        on_serialized: called once the payload is serialized into the temp
            file, before the fsync: from then on its tensors are not read
            (a background save's fence lifts there).

    Returns:
        The written file's info (``sha256`` is what an index records).

    Raises:
        TypeError: ``payload`` is not a dict.
        CheckpointWriteError: serializing or writing failed; nothing under
            ``path`` changed and no temp file is left.
    """
    path = os.fspath(path)
    serialized = isinstance(payload, SerializedPayload)
    if not serialized and not isinstance(payload, dict):
        raise TypeError(fix_message(f"payload must be a dict, got {type(payload).__name__}.", "wrap it: {'state': obj}."))
    record = record if record is not None else CheckpointRecord(os.path.basename(path), step=0, epoch=0, order=0)
    try:
        if not serialized:
            check_payload_types(payload)  # the load-side allow-list, checked on the objects: no pickle scan here
    except TypeError as exc:
        what, _, how = str(exc).partition(" To fix: ")
        raise CheckpointWriteError(fix_message(f"Cannot save the checkpoint {path!r}: {what} Nothing was written.", how)) from exc
    sealed: list[streaming.SealedFile] = []

    def write(fileobj: IO[bytes]) -> None:
        # Serialized, hashed and written in one pass straight into the temp file (no archive in memory),
        # or a small archive serialized earlier, hashed and written in one piece.
        try:
            sealed.append(streaming.write_sealed(fileobj, payload, record))
        except OSError:
            raise  # the disk's failure (ENOSPC, EIO...): atomic_write names it
        except Exception as exc:
            raise CheckpointWriteError(
                fix_message(
                    f"Cannot serialize the checkpoint for {path!r}: {exc}. Nothing was written.",
                    "store only tensors, numbers, strings, None and dicts/lists/tuples of them "
                    "(convert numpy arrays with torch.from_numpy).",
                )
            ) from exc
        if on_serialized is not None:
            on_serialized()

    atomic_write(path, write, replace=replace, sync_directory=sync_directory)
    meta = payload.meta if serialized else payload.get("meta")
    return CheckpointFileInfo(path, sealed[0].size_bytes, sealed[0].sha256, meta if isinstance(meta, dict) else None, record)


def seal_archive_file(path: str | os.PathLike[str], record: CheckpointRecord) -> CheckpointFileInfo:
    """Append ``record`` and a format-2 trailer to a plain zip archive file, in place.

    For tools that write the archive themselves (and for tests that craft
    one): the archive is hashed in 1 MiB chunks, never held in memory.

    Args:
        path: a file holding only a ``torch.save``-style zip archive.
        record: the self-description to seal into it.

    Returns:
        The sealed file's info (not verified: call :func:`verify_checkpoint_file`).
    """
    path = os.fspath(path)
    digest = hashlib.sha256()
    with open_regular(path) as fileobj:
        while chunk := fileobj.read(CHUNK):
            digest.update(chunk)
        archive_length = fileobj.tell()
    record_bytes = record.to_bytes()
    digest.update(record_bytes)
    trailer = trailer_v2(digest, archive_length, len(record_bytes))
    with open_regular(path, append=True) as fileobj:
        fileobj.write(record_bytes + trailer)
    whole = digest.copy()
    whole.update(trailer)
    return CheckpointFileInfo(path, archive_length + len(record_bytes) + len(trailer), whole.hexdigest(), None, record)


def _scan_archive(fileobj: IO[bytes], length: int) -> None:
    """Check the archive's structure and pickles (a module-level hook tests can replace)."""
    check_archive(fileobj, length)


def _refused(path: str, exc: ValueError) -> CheckpointCorruptError:
    return corrupt(path, f"refused: the file carries code or unknown types ({exc})", "load only checkpoints you trust were written by engine_kit.")


def _safe_load(path: str, zip_bytes: bytes, map_location: Any) -> dict[str, Any]:
    try:
        _scan_archive(io.BytesIO(zip_bytes), len(zip_bytes))
    except ValueError as exc:
        raise _refused(path, exc) from exc
    conflict = weights_only_env_conflict()
    if conflict is not None:
        raise CheckpointError(fix_message(f"Cannot load {path!r} safely: {conflict}.", "unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD."))
    try:
        # weights_only=True, explicitly, every time: torch lets the env var
        # override only an *unset* weights_only.
        payload = torch.load(io.BytesIO(zip_bytes), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise corrupt(path, f"refused: the file carries code that weights_only loading rejects ({reason})") from exc
    except Exception as exc:
        raise corrupt(path, f"torch.load failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(payload, dict):
        raise corrupt(path, f"its payload is a {type(payload).__name__}, not a dict")
    return payload


def load_verified(path: str | os.PathLike[str], map_location: Any = "cpu") -> tuple[dict[str, Any], CheckpointRecord | None, str]:
    """Verify a file and load it from the very bytes that were hashed.

    Returns:
        (payload, its record or ``None`` for format 1, hex SHA-256 of the whole file).

    Raises:
        CheckpointCorruptError: as :func:`load_checkpoint_file`.
    """
    path = os.fspath(path)
    zip_bytes, record, file_sha = read_sealed(path)
    return _safe_load(path, zip_bytes, map_location), record, file_sha


def load_checkpoint_file(
    path: str | os.PathLike[str], map_location: Any = "cpu", *, expected_sha256: str | None = None
) -> dict[str, Any]:
    """Verify a checkpoint file, then load its payload without executing code.

    Args:
        path: the ``.ekpt`` file.
        map_location: passed to ``torch.load``.
        expected_sha256: hex digest of the whole file the caller recorded (an
            index's); checked on the same bytes that are loaded.

    Returns:
        The payload dict.

    Raises:
        CheckpointCorruptError: missing, empty, truncated, altered, a digest
            other than ``expected_sha256``, or a pickle that carries code;
            NotARegularFileError for a FIFO, directory or device.
    """
    path = os.fspath(path)
    zip_bytes, _record, file_sha = read_sealed(path)
    if expected_sha256 is not None and file_sha != expected_sha256:
        raise corrupt(path, f"its SHA-256 {file_sha[:16]}... differs from the recorded {expected_sha256[:16]}... (replaced or altered)")
    return _safe_load(path, zip_bytes, map_location)


def verify_checkpoint_file(path: str | os.PathLike[str]) -> CheckpointFileInfo:
    """Check a file end to end in constant memory: trailer, digest, record, archive, pickle allow-list.

    The payload is not unpickled (``meta`` is ``None``); tensor data is only
    hashed. Memory stays at a few MiB whatever the file's size.

    Args:
        path: the ``.ekpt`` file.

    Returns:
        Its :class:`CheckpointFileInfo`, with the verified ``record``.

    Raises:
        CheckpointCorruptError: with a one-line reason naming ``path``
            (NotARegularFileError for a FIFO, directory or device).
    """
    path = os.fspath(path)
    fileobj, size = open_checkpoint(path)
    with fileobj:
        seal = read_seal(path, fileobj, size)
        digest, record_bytes = stream_digest(path, fileobj, seal)
        if digest.digest() != seal.digest:
            raise digest_mismatch(path)
        record = parse_record(path, seal, record_bytes)
        try:
            _scan_archive(fileobj, seal.archive_length)
        except ValueError as exc:
            raise _refused(path, exc) from exc
    digest.update(seal.trailer)
    return CheckpointFileInfo(path, size, digest.hexdigest(), None, record)

