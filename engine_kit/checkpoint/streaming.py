"""Write a sealed ``.ekpt`` file in one streaming pass: serialize, hash and write together.

``torch.save`` writes its zip archive straight into the (temp) file through
a :class:`HashingWriter`, which feeds every chunk to SHA-256 on its way to
the file: no in-memory copy of the archive, no second pass over the bytes.
The record and the trailer follow (layout in :mod:`engine_kit.checkpoint.seal`).
Synchronous and background saves both write through :func:`write_sealed`,
so the same state gives the same bytes either way.

>>> import io, torch
>>> from engine_kit.checkpoint.record import CheckpointRecord
>>> out = io.BytesIO()
>>> sealed = write_sealed(out, {"w": torch.ones(2)}, CheckpointRecord("a.ekpt", step=1, epoch=0, order=1))
>>> sealed.size_bytes == len(out.getvalue())
True
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import IO, Any

import torch

from engine_kit.checkpoint.record import CheckpointRecord
from engine_kit.checkpoint.seal import trailer_v2
from engine_kit.checkpoint.serialized import SerializedPayload


class HashingWriter:
    """A write-only file object that hashes what passes through it and counts the bytes.

    ``torch.save`` hands over an archive in many small pieces (headers, the
    pickle, each record's name) and a few large ones (tensor storages).
    Pieces under ``SMALL`` bytes are gathered and hashed and written
    together, so a small checkpoint costs a few calls instead of one per
    piece; large ones go straight through, uncopied. ``digest`` and
    ``flush()`` first pass on what is gathered.

    Args:
        fileobj: where the bytes go (a binary file open for writing).
        digest: the running hash (default: a new SHA-256).

    >>> import io
    >>> writer = HashingWriter(io.BytesIO())
    >>> writer.write(b"abc"), writer.written, writer.digest.hexdigest()[:12]
    (3, 3, 'ba7816bf8f01')
    """

    SMALL = 64 * 1024
    GATHER = 256 * 1024  # bytes gathered before they are passed on

    def __init__(self, fileobj: IO[bytes], digest: Any = None) -> None:
        self.fileobj = fileobj
        self._digest = digest if digest is not None else hashlib.sha256()
        self._gathered = bytearray()
        self.written = 0
        self.failure: BaseException | None = None  # the file's own error (torch.save hides it behind its own)

    @property
    def digest(self) -> Any:
        """The running hash of every byte written so far."""
        self._pass_on()
        return self._digest

    def write(self, data: Any) -> int:
        """Hash ``data`` and write it (small pieces gathered first); returns its length in bytes."""
        view = memoryview(data)  # torch hands storages over without copying them; keep it that way
        size = view.nbytes
        if size < self.SMALL:
            self._gathered += view
            if len(self._gathered) >= self.GATHER:
                self._pass_on()
        else:
            self._pass_on()
            self._hash_and_write(view)
        self.written += size
        return size

    def flush(self) -> None:
        """Pass on what is gathered and flush the underlying file (``torch.save`` calls it when its archive is complete)."""
        self._pass_on()
        self.fileobj.flush()

    def _pass_on(self) -> None:
        if self._gathered:
            gathered, self._gathered = self._gathered, bytearray()
            self._hash_and_write(memoryview(gathered))

    def _hash_and_write(self, view: memoryview) -> None:
        self._digest.update(view)  # hashlib releases the GIL on large buffers: training runs on meanwhile
        try:
            self.fileobj.write(view)
        except BaseException as exc:
            self.failure = exc
            raise


@dataclasses.dataclass(frozen=True)
class SealedFile:
    """What :func:`write_sealed` wrote.

    Attributes:
        size_bytes: archive, record and trailer together.
        sha256: hex SHA-256 of all of them (what an index records).
        archive_length: bytes of the ``torch.save`` archive.
    """

    size_bytes: int
    sha256: str
    archive_length: int


def write_sealed(fileobj: IO[bytes], payload: dict[str, Any] | SerializedPayload, record: CheckpointRecord) -> SealedFile:
    """Stream ``torch.save(payload)``, then ``record`` and the trailer, into ``fileobj``.

    ``fileobj`` must start empty (the archive's offsets count from its start).
    The payload's tensors are read while this runs: a caller serializing
    live tensors must keep them unchanged until it returns. A payload
    serialized already (``SerializedPayload``) is hashed and written as it is:
    the same bytes.

    Raises:
        OSError: the file's own error (ENOSPC, EIO...), also when it happened
            inside ``torch.save`` (which reports it as a RuntimeError of its own).
        Exception: whatever else ``torch.save`` raises (an unserializable payload).
        A caller such as :func:`~engine_kit.checkpoint.atomic.atomic_write`
        removes the partial file.
    """
    writer = HashingWriter(fileobj)
    try:
        if isinstance(payload, SerializedPayload):
            writer.write(payload.archive)
        else:
            torch.save(payload, writer)
    except Exception:
        if writer.failure is not None:
            raise writer.failure from None
        raise
    archive_length = writer.written
    record_bytes = record.to_bytes()
    writer.write(record_bytes)
    digest = writer.digest  # everything gathered is written and hashed from here on
    trailer = trailer_v2(digest, archive_length, len(record_bytes))
    whole = digest.copy()
    whole.update(trailer)
    fileobj.write(trailer)
    return SealedFile(writer.written + len(trailer), whole.hexdigest(), archive_length)
