"""Check a ``torch.save`` zip archive with bounded memory, before torch reads it.

The archive is read through a seekable file object (a window onto the file's
data region, or an in-memory buffer), never as a whole. Everything is capped
*before* it is read, so a crafted file cannot make us allocate more than a
few tens of MiB:

- the central directory (size and entry count, from the end-of-archive
  record) before ``zipfile`` loads it;
- every member's declared size against the archive's own size, and its
  storage method: ``torch.save`` stores members uncompressed, so a
  compressed member (the shape of a zip bomb) is refused unread;
- each pickle member is streamed through the opcode scanner
  (:func:`~engine_kit.checkpoint.safety.scan_pickle_stream`) with a byte
  budget, so neither its declared nor its actual size can exceed the cap.

Tensor data is never read here; the file's SHA-256 covers its integrity.

>>> import io, torch
>>> buffer = io.BytesIO()
>>> torch.save({"w": torch.ones(2)}, buffer)
>>> check_archive(buffer, len(buffer.getvalue()))
"""

from __future__ import annotations

import io
import struct
import zipfile
from typing import IO

from engine_kit.checkpoint.safety import scan_pickle_stream

MAX_MEMBERS = 100_000
MAX_CENTRAL_DIRECTORY_BYTES = 64 << 20
MAX_PICKLE_BYTES = 64 << 20

_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"
_MAX_COMMENT = 0xFFFF


class FileWindow(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes of an open file from offset 0.

    The zip reader sees the archive exactly as ``torch.save`` wrote it, without
    the record and trailer that follow it, and without copying it to memory.

    Args:
        fileobj: a seekable binary file (its position is moved freely).
        length: how many bytes from the start belong to the window.
    """

    def __init__(self, fileobj: IO[bytes], length: int) -> None:
        super().__init__()
        self._file = fileobj
        self._length = length
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        wanted = min(len(buffer), max(0, self._length - self._position))
        if wanted == 0:
            return 0
        self._file.seek(self._position)
        data = self._file.read(wanted)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


class BoundedReader:
    """The ``read``/``readline`` of ``source``, failing once more than ``limit`` bytes came out.

    What the pickle scanner reads through: a member's actual size can never
    exceed what its header declared (and the cap checked against it).
    """

    def __init__(self, source: IO[bytes], limit: int, what: str) -> None:
        self._source = source
        self._left = limit
        self._limit = limit
        self._what = what

    def _count(self, data: bytes) -> bytes:
        if len(data) > self._left:
            raise ValueError(f"{self._what} yields more than its {self._limit} bytes")
        self._left -= len(data)
        return data

    def read(self, size: int = -1) -> bytes:
        """At most ``size`` bytes (all that is left when negative), within the budget."""
        wanted = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        return self._count(self._source.read(wanted))

    def readline(self) -> bytes:
        """One line, within the budget."""
        return self._count(self._source.readline(self._left + 1))


def _central_directory_extent(fileobj: IO[bytes], length: int) -> tuple[int, int]:
    """(entry count, central-directory size) from the end-of-archive records; ValueError if absent."""
    tail_size = min(length, _EOCD.size + _MAX_COMMENT)
    fileobj.seek(length - tail_size)
    tail = fileobj.read(tail_size)
    at = tail.rfind(_EOCD_SIGNATURE)
    if at < 0 or len(tail) - at < _EOCD.size:
        raise ValueError("not a zip archive (no end-of-archive record)")
    _sig, _disk, _cd_disk, _here, entries, cd_size, _cd_offset, _comment = _EOCD.unpack_from(tail, at)
    if entries == 0xFFFF or cd_size == 0xFFFFFFFF:
        # Zip64: the real counts sit in the zip64 record the locator points at.
        locator_at = length - tail_size + at - _ZIP64_LOCATOR.size
        if locator_at < 0:
            raise ValueError("a zip64 archive without its zip64 locator")
        fileobj.seek(locator_at)
        signature, _disk, record_at, _disks = _ZIP64_LOCATOR.unpack(fileobj.read(_ZIP64_LOCATOR.size))
        if signature != _ZIP64_LOCATOR_SIGNATURE or record_at + _ZIP64_EOCD.size > length:
            raise ValueError("a zip64 archive whose zip64 locator is damaged")
        fileobj.seek(record_at)
        fields = _ZIP64_EOCD.unpack(fileobj.read(_ZIP64_EOCD.size))
        if fields[0] != _ZIP64_EOCD_SIGNATURE:
            raise ValueError("a zip64 archive whose zip64 end record is damaged")
        entries, cd_size = fields[7], fields[8]
    return entries, cd_size


def check_archive(fileobj: IO[bytes], length: int) -> None:
    """Check structure, sizes and pickles of a ``torch.save`` archive; ValueError with the reason.

    Args:
        fileobj: a seekable binary file whose first ``length`` bytes are the archive.
        length: the archive's size.

    Raises:
        ValueError: one-line reason (too many members, a member larger than
            the archive or compressed, duplicate names, no ``data.pkl``, a
            pickle over the cap or carrying a disallowed global).
    """
    window = FileWindow(fileobj, length)
    entries, cd_size = _central_directory_extent(window, length)
    if entries > MAX_MEMBERS:
        raise ValueError(f"the archive lists {entries} members, more than the {MAX_MEMBERS} accepted")
    if cd_size > min(length, MAX_CENTRAL_DIRECTORY_BYTES):
        raise ValueError(f"the archive's directory declares {cd_size} bytes, more than the {min(length, MAX_CENTRAL_DIRECTORY_BYTES)} accepted")
    try:
        with zipfile.ZipFile(window) as archive:
            members = archive.infolist()
            _check_members(members, length)
            for member in members:
                if member.filename.endswith(".pkl"):
                    with archive.open(member) as stream:
                        scan_pickle_stream(BoundedReader(stream, member.file_size, f"member {member.filename!r}"))
    except zipfile.BadZipFile as exc:
        raise ValueError(f"not a valid zip archive ({exc})") from exc


def _check_members(members: list[zipfile.ZipInfo], length: int) -> None:
    names = [member.filename for member in members]
    if len(set(names)) != len(names):
        # Zip readers disagree on which duplicate wins; torch could unpickle one we did not scan.
        raise ValueError("the archive holds duplicate member names")
    if not any(name.endswith("/data.pkl") for name in names):
        raise ValueError("the archive has no data.pkl (not a torch.save file)")
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"member {member.filename!r} is compressed (method {member.compress_type}); torch.save stores members uncompressed")
        if member.file_size != member.compress_size or member.header_offset + member.file_size > length:
            raise ValueError(
                f"member {member.filename!r} declares {member.file_size} bytes, more than the {length}-byte archive holds"
            )
        if member.filename.endswith(".pkl") and member.file_size > MAX_PICKLE_BYTES:
            raise ValueError(f"pickle member {member.filename!r} declares {member.file_size} bytes, over the {MAX_PICKLE_BYTES}-byte cap")

