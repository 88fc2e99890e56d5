"""The sealed layout of a ``.ekpt`` file: trailer formats, digests, the record at the end.

Format 2 (written)::

    [ torch.save zip archive, N bytes ][ record: compact JSON, R bytes ]
    [ b"EKCKPT2\0" ][ SHA-256 of the N + R bytes, 32 ][ N, u64 big-endian ][ R, u64 big-endian ]

Format 1 (still read): ``[zip][b"EKCKPT1\0"][SHA-256 of zip][N]``, no record.

Everything here opens files with :func:`~engine_kit.checkpoint.regular.open_regular`
(never blocks on a FIFO) and reads in 1 MiB chunks where it can; failures
are :class:`~engine_kit.errors.CheckpointCorruptError` with a one-line reason.

>>> len(make_trailer(b"abc")) == TRAILER_SIZE
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from typing import IO, Any, BinaryIO

from engine_kit.checkpoint.record import MAX_RECORD_BYTES, CheckpointRecord
from engine_kit.checkpoint.regular import open_regular
from engine_kit.errors import CheckpointCorruptError, fix_message

MAGIC = b"EKCKPT1\0"
TRAILER_SIZE = len(MAGIC) + 32 + 8
MAGIC_V2 = b"EKCKPT2\0"
TRAILER_V2_SIZE = len(MAGIC_V2) + 32 + 8 + 8
CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Seal:
    """A parsed trailer: where the archive and the record end, and their digest."""

    archive_length: int
    record_length: int
    digest: bytes
    trailer: bytes

    @property
    def covered(self) -> int:
        """Bytes the digest covers: archive and record."""
        return self.archive_length + self.record_length


def make_trailer(zip_bytes: bytes | memoryview, digest: Any = None) -> bytes:
    """The format-1 trailer (48 bytes, no record) that seals ``zip_bytes``.

    >>> len(make_trailer(b"abc")) == TRAILER_SIZE
    True
    """
    digest = digest if digest is not None else hashlib.sha256(zip_bytes)
    return MAGIC + digest.digest() + struct.pack(">Q", len(zip_bytes))


def trailer_v2(digest: Any, archive_length: int, record_length: int) -> bytes:
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
        while chunk := fileobj.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def corrupt(path: str, reason: str, fix: str = "fall back to an older checkpoint.") -> CheckpointCorruptError:
    return CheckpointCorruptError(fix_message(f"Checkpoint {path!r} is unusable: {reason}.", fix))


def open_checkpoint(path: str) -> tuple[BinaryIO, int]:
    """Open a regular file without blocking; return it and its size."""
    try:
        fileobj = open_regular(path, "checkpoint")
    except OSError as exc:
        raise corrupt(path, f"it cannot be read ({exc!r})", "check that the file exists and the disk is healthy.") from exc
    return fileobj, os.fstat(fileobj.fileno()).st_size


def read_seal(path: str, fileobj: IO[bytes], size: int) -> Seal:
    """Parse the trailer of either format; CheckpointCorruptError when absent or inconsistent."""
    if size < TRAILER_SIZE:
        raise corrupt(path, f"it is {size} bytes, shorter than the {TRAILER_SIZE}-byte trailer (empty or truncated)")
    fileobj.seek(size - min(size, TRAILER_V2_SIZE))
    tail = fileobj.read(TRAILER_V2_SIZE)
    if len(tail) == TRAILER_V2_SIZE and tail.startswith(MAGIC_V2):
        archive_length, record_length = struct.unpack(">QQ", tail[-16:])
        seal = Seal(archive_length, record_length, tail[len(MAGIC_V2) : len(MAGIC_V2) + 32], tail)
        if record_length > MAX_RECORD_BYTES:
            raise corrupt(path, f"its trailer records a {record_length}-byte record, over the {MAX_RECORD_BYTES}-byte limit")
    elif tail[-TRAILER_SIZE:].startswith(MAGIC):
        trailer = tail[-TRAILER_SIZE:]
        (archive_length,) = struct.unpack(">Q", trailer[-8:])
        seal = Seal(archive_length, 0, trailer[len(MAGIC) : len(MAGIC) + 32], trailer)
    else:
        raise corrupt(path, "no engine_kit trailer at its end (truncated, appended to, or not written by engine_kit)")
    if seal.covered != size - len(seal.trailer):
        raise corrupt(path, f"its trailer records {seal.covered} bytes of data but {size - len(seal.trailer)} precede it (truncated or spliced)")
    return seal


def parse_record(path: str, seal: Seal, record_bytes: bytes) -> CheckpointRecord | None:
    if seal.record_length == 0 and not seal.trailer.startswith(MAGIC_V2):
        return None
    try:
        return CheckpointRecord.from_bytes(record_bytes)
    except ValueError as exc:
        raise corrupt(path, str(exc)) from exc


def digest_mismatch(path: str) -> CheckpointCorruptError:
    return corrupt(path, "its SHA-256 does not match the trailer (a byte was altered on disk or in transit)")


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
    fileobj, size = open_checkpoint(path)
    with fileobj:
        seal = read_seal(path, fileobj, size)
        fileobj.seek(seal.archive_length)
        return parse_record(path, seal, fileobj.read(seal.record_length))


def read_sealed(path: str) -> tuple[bytes, CheckpointRecord | None, str]:
    """Read and check a whole file into memory; return (zip bytes, record, file sha256 hex)."""
    fileobj, size = open_checkpoint(path)
    try:
        with fileobj:
            seal = read_seal(path, fileobj, size)
            fileobj.seek(0)
            zip_bytes = fileobj.read(seal.archive_length)
            record_bytes = fileobj.read(seal.record_length)
    except OSError as exc:
        raise corrupt(path, f"it cannot be read ({exc!r})", "check that the file exists and the disk is healthy.") from exc
    digest = hashlib.sha256(zip_bytes)
    digest.update(record_bytes)
    if len(zip_bytes) + len(record_bytes) != seal.covered or digest.digest() != seal.digest:
        raise digest_mismatch(path)
    digest.update(seal.trailer)
    return zip_bytes, parse_record(path, seal, record_bytes), digest.hexdigest()


def stream_digest(path: str, fileobj: IO[bytes], seal: Seal) -> tuple[Any, bytes]:
    """SHA-256 of the sealed region in 1 MiB chunks, and the record bytes at its end."""
    digest = hashlib.sha256()
    record = bytearray()
    position = 0
    fileobj.seek(0)
    try:
        while position < seal.covered:
            chunk = fileobj.read(min(CHUNK, seal.covered - position))
            if not chunk:
                raise corrupt(path, "it shrank while being read")
            digest.update(chunk)
            if position + len(chunk) > seal.archive_length:
                record += chunk[max(0, seal.archive_length - position) :]
            position += len(chunk)
    except OSError as exc:
        raise corrupt(path, f"it cannot be read ({exc!r})", "check that the disk is healthy.") from exc
    return digest, bytes(record)
