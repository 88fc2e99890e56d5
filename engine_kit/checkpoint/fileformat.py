"""One checkpoint file: ``torch.save`` bytes and a self-description, sealed with SHA-256.

Layout of a ``.ekpt`` file (format 2)::

    [ torch.save zip archive, N bytes ][ record: compact JSON, R bytes ]
    [ b"EKCKPT2\0" ][ SHA-256 of the N + R bytes, 32 ][ N, u64 big-endian ][ R, u64 big-endian ]

The record (:class:`~engine_kit.checkpoint.record.CheckpointRecord`: name,
step, epoch, metric, tags, creation order, run identity, time) lies inside
what the digest covers, so a file describes itself and a directory's index
can be rebuilt from its files. Files of format 1 (``[zip][b"EKCKPT1\0"]
[SHA-256 of zip][N]``, no record) still verify and load.

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
import struct
from typing import IO, Any, BinaryIO

import torch

from engine_kit.checkpoint.archive import check_archive
from engine_kit.checkpoint.atomic import atomic_write
from engine_kit.checkpoint.record import MAX_RECORD_BYTES, CheckpointRecord
from engine_kit.checkpoint.regular import open_regular
from engine_kit.checkpoint.safety import weights_only_env_conflict
from engine_kit.errors import CheckpointCorruptError, CheckpointError, CheckpointWriteError, NotARegularFileError, fix_message

MAGIC = b"EKCKPT1\0"
TRAILER_SIZE = len(MAGIC) + 32 + 8
MAGIC_V2 = b"EKCKPT2\0"
TRAILER_V2_SIZE = len(MAGIC_V2) + 32 + 8 + 8
_CHUNK = 1 << 20


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


@dataclasses.dataclass(frozen=True)
class _Seal:
    """A parsed trailer: where the archive and the record end, and their digest."""

    archive_length: int
    record_length: int
    digest: bytes
    trailer: bytes

    @property
    def covered(self) -> int:
        return self.archive_length + self.record_length


def make_trailer(zip_bytes: bytes | memoryview, digest: Any = None) -> bytes:
    """The format-1 trailer (48 bytes, no record) that seals ``zip_bytes``.

    >>> len(make_trailer(b"abc")) == TRAILER_SIZE
    True
    """
    digest = digest if digest is not None else hashlib.sha256(zip_bytes)
    return MAGIC + digest.digest() + struct.pack(">Q", len(zip_bytes))


def _trailer_v2(digest: Any, archive_length: int, record_length: int) -> bytes:
    return MAGIC_V2 + digest.digest() + struct.pack(">QQ", archive_length, record_length)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a whole regular file, read in 1 MiB chunks.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile(delete=False) as f:
    ...     _ = f.write(b"abc")
    >>> sha256_file(f.name)[:12]
    'ba7816bf8f01'
    """
    digest = hashlib.sha256()
    with open_regular(path) as fileobj:
        while chunk := fileobj.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _corrupt(path: str, reason: str, fix: str = "fall back to an older checkpoint.") -> CheckpointCorruptError:
    return CheckpointCorruptError(fix_message(f"Checkpoint {path!r} is unusable: {reason}.", fix))


def save_checkpoint_file(
    path: str | os.PathLike[str], payload: dict[str, Any], *, record: CheckpointRecord | None = None, replace: bool = True
) -> CheckpointFileInfo:
    """Serialize ``payload``, seal it with ``record`` and write it atomically.

    The pickle is checked against the load-time allow-list *before* anything
    touches the disk, so a payload that could never be loaded safely (a
    numpy array, a custom class) fails now, not at resume time.

    Args:
        path: the final file name (its directory must exist).
        payload: a dict of tensors, numbers, strings and containers of them.
        record: the file's self-description; default: its name, step 0.
        replace: False refuses (``CheckpointExistsError``) when something
            already sits at ``path``, even if it appears during the write.

    Returns:
        The written file's info (``sha256`` is what an index records).

    Raises:
        TypeError: ``payload`` is not a dict.
        CheckpointWriteError: serializing or writing failed; nothing under
            ``path`` changed and no temp file is left.
    """
    path = os.fspath(path)
    if not isinstance(payload, dict):
        raise TypeError(fix_message(f"payload must be a dict, got {type(payload).__name__}.", "wrap it: {'state': obj}."))
    record = record if record is not None else CheckpointRecord(os.path.basename(path), step=0, epoch=0, order=0)
    buffer = io.BytesIO()
    try:
        torch.save(payload, buffer)
        _scan_archive(buffer, buffer.getbuffer().nbytes)
        zip_bytes = buffer.getbuffer()  # a view: no copy of a multi-GB checkpoint
    except Exception as exc:
        raise CheckpointWriteError(
            fix_message(
                f"Cannot serialize the checkpoint for {path!r}: {exc}. Nothing was written.",
                "store only tensors, numbers, strings, None and dicts/lists/tuples of them "
                "(convert numpy arrays with torch.from_numpy).",
            )
        ) from exc
    record_bytes = record.to_bytes()
    # One pass of SHA-256 over the data serves both the trailer and the whole-file digest.
    digest = hashlib.sha256(zip_bytes)
    digest.update(record_bytes)
    trailer = _trailer_v2(digest, len(zip_bytes), len(record_bytes))
    whole = digest.copy()
    whole.update(trailer)

    def write(fileobj: IO[bytes]) -> None:
        fileobj.write(zip_bytes)
        fileobj.write(record_bytes)
        fileobj.write(trailer)

    atomic_write(path, write, replace=replace)
    meta = payload.get("meta")
    size = len(zip_bytes) + len(record_bytes) + len(trailer)
    return CheckpointFileInfo(path, size, whole.hexdigest(), meta if isinstance(meta, dict) else None, record)


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
        while chunk := fileobj.read(_CHUNK):
            digest.update(chunk)
        archive_length = fileobj.tell()
    record_bytes = record.to_bytes()
    digest.update(record_bytes)
    trailer = _trailer_v2(digest, archive_length, len(record_bytes))
    with open(path, "ab") as fileobj:
        fileobj.write(record_bytes + trailer)
    whole = digest.copy()
    whole.update(trailer)
    return CheckpointFileInfo(path, archive_length + len(record_bytes) + len(trailer), whole.hexdigest(), None, record)


def _open_checkpoint(path: str) -> tuple[BinaryIO, int]:
    """Open a regular file without blocking; return it and its size."""
    try:
        fileobj = open_regular(path, "checkpoint")
    except NotARegularFileError as exc:
        raise NotARegularFileError(str(exc).replace(" To fix:", " (not a checkpoint) To fix:", 1)) from None
    except OSError as exc:
        raise _corrupt(path, f"it cannot be read ({exc!r})", "check that the file exists and the disk is healthy.") from exc
    return fileobj, os.fstat(fileobj.fileno()).st_size


def _read_seal(path: str, fileobj: IO[bytes], size: int) -> _Seal:
    """Parse the trailer of either format; CheckpointCorruptError when absent or inconsistent."""
    if size < TRAILER_SIZE:
        raise _corrupt(path, f"it is {size} bytes, shorter than the {TRAILER_SIZE}-byte trailer (empty or truncated)")
    fileobj.seek(size - min(size, TRAILER_V2_SIZE))
    tail = fileobj.read(TRAILER_V2_SIZE)
    if len(tail) == TRAILER_V2_SIZE and tail.startswith(MAGIC_V2):
        archive_length, record_length = struct.unpack(">QQ", tail[-16:])
        seal = _Seal(archive_length, record_length, tail[len(MAGIC_V2) : len(MAGIC_V2) + 32], tail)
        if record_length > MAX_RECORD_BYTES:
            raise _corrupt(path, f"its trailer records a {record_length}-byte record, over the {MAX_RECORD_BYTES}-byte limit")
    elif tail[-TRAILER_SIZE:].startswith(MAGIC):
        trailer = tail[-TRAILER_SIZE:]
        (archive_length,) = struct.unpack(">Q", trailer[-8:])
        seal = _Seal(archive_length, 0, trailer[len(MAGIC) : len(MAGIC) + 32], trailer)
    else:
        raise _corrupt(path, "no engine_kit trailer at its end (truncated, appended to, or not written by engine_kit)")
    if seal.covered != size - len(seal.trailer):
        raise _corrupt(path, f"its trailer records {seal.covered} bytes of data but {size - len(seal.trailer)} precede it (truncated or spliced)")
    return seal


def _parse_record(path: str, seal: _Seal, record_bytes: bytes) -> CheckpointRecord | None:
    if seal.record_length == 0 and not seal.trailer.startswith(MAGIC_V2):
        return None
    try:
        return CheckpointRecord.from_bytes(record_bytes)
    except ValueError as exc:
        raise _corrupt(path, str(exc)) from exc


def _digest_mismatch(path: str) -> CheckpointCorruptError:
    return _corrupt(path, "its SHA-256 does not match the trailer (a byte was altered on disk or in transit)")


def read_record(path: str | os.PathLike[str]) -> CheckpointRecord | None:
    """A file's record, read from its end without checking its digest (cheap: no data is read).

    Use it to list or plan; trust it only for a file that verified
    (:func:`verify_checkpoint_file` returns the verified record).

    Returns:
        The record, or ``None`` for a format-1 file (which has none).

    Raises:
        CheckpointCorruptError: no trailer, inconsistent lengths, a record
            that is not valid; NotARegularFileError for a FIFO, directory...
    """
    path = os.fspath(path)
    fileobj, size = _open_checkpoint(path)
    with fileobj:
        seal = _read_seal(path, fileobj, size)
        fileobj.seek(seal.archive_length)
        return _parse_record(path, seal, fileobj.read(seal.record_length))


def _read_sealed(path: str) -> tuple[bytes, CheckpointRecord | None, str]:
    """Read and check a whole file into memory; return (zip bytes, record, file sha256 hex)."""
    fileobj, size = _open_checkpoint(path)
    try:
        with fileobj:
            seal = _read_seal(path, fileobj, size)
            fileobj.seek(0)
            zip_bytes = fileobj.read(seal.archive_length)
            record_bytes = fileobj.read(seal.record_length)
    except OSError as exc:
        raise _corrupt(path, f"it cannot be read ({exc!r})", "check that the file exists and the disk is healthy.") from exc
    digest = hashlib.sha256(zip_bytes)
    digest.update(record_bytes)
    if len(zip_bytes) + len(record_bytes) != seal.covered or digest.digest() != seal.digest:
        raise _digest_mismatch(path)
    digest.update(seal.trailer)
    return zip_bytes, _parse_record(path, seal, record_bytes), digest.hexdigest()


def _scan_archive(fileobj: IO[bytes], length: int) -> None:
    """Check the archive's structure and pickles (a module-level hook tests can replace)."""
    check_archive(fileobj, length)


def _refused(path: str, exc: ValueError) -> CheckpointCorruptError:
    return _corrupt(path, f"refused: the file carries code or unknown types ({exc})", "load only checkpoints you trust were written by engine_kit.")


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
        raise _corrupt(path, f"refused: the file carries code that weights_only loading rejects ({reason})") from exc
    except Exception as exc:
        raise _corrupt(path, f"torch.load failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(payload, dict):
        raise _corrupt(path, f"its payload is a {type(payload).__name__}, not a dict")
    return payload


def load_verified(path: str | os.PathLike[str], map_location: Any = "cpu") -> tuple[dict[str, Any], CheckpointRecord | None, str]:
    """Verify a file and load it from the very bytes that were hashed.

    Returns:
        (payload, its record or ``None`` for format 1, hex SHA-256 of the whole file).

    Raises:
        CheckpointCorruptError: as :func:`load_checkpoint_file`.
    """
    path = os.fspath(path)
    zip_bytes, record, file_sha = _read_sealed(path)
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
    zip_bytes, _record, file_sha = _read_sealed(path)
    if expected_sha256 is not None and file_sha != expected_sha256:
        raise _corrupt(path, f"its SHA-256 {file_sha[:16]}... differs from the recorded {expected_sha256[:16]}... (replaced or altered)")
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
    fileobj, size = _open_checkpoint(path)
    with fileobj:
        seal = _read_seal(path, fileobj, size)
        digest, record_bytes = _stream_digest(path, fileobj, seal)
        if digest.digest() != seal.digest:
            raise _digest_mismatch(path)
        record = _parse_record(path, seal, record_bytes)
        try:
            _scan_archive(fileobj, seal.archive_length)
        except ValueError as exc:
            raise _refused(path, exc) from exc
    digest.update(seal.trailer)
    return CheckpointFileInfo(path, size, digest.hexdigest(), None, record)


def _stream_digest(path: str, fileobj: IO[bytes], seal: _Seal) -> tuple[Any, bytes]:
    """SHA-256 of the sealed region in 1 MiB chunks, and the record bytes at its end."""
    digest = hashlib.sha256()
    record = bytearray()
    position = 0
    fileobj.seek(0)
    try:
        while position < seal.covered:
            chunk = fileobj.read(min(_CHUNK, seal.covered - position))
            if not chunk:
                raise _corrupt(path, "it shrank while being read")
            digest.update(chunk)
            if position + len(chunk) > seal.archive_length:
                record += chunk[max(0, seal.archive_length - position) :]
            position += len(chunk)
    except OSError as exc:
        raise _corrupt(path, f"it cannot be read ({exc!r})", "check that the disk is healthy.") from exc
    return digest, bytes(record)
