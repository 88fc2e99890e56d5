"""HashingWriter: small pieces gathered, large ones passed straight on; same bytes, same hash, same failure."""

from __future__ import annotations

import errno
import hashlib
import io

import pytest

from engine_kit.checkpoint.streaming import HashingWriter


def pieces() -> list[bytes]:
    sizes = [10, HashingWriter.SMALL + 1, 5, HashingWriter.GATHER, 3] + [HashingWriter.SMALL - 1] * 5 + [1]
    return [bytes([i % 251]) * size for i, size in enumerate(sizes)]


def test_gathered_and_direct_pieces_give_the_bytes_and_digest_of_the_whole() -> None:
    out = io.BytesIO()
    writer = HashingWriter(out)
    for piece in pieces():
        assert writer.write(memoryview(piece)) == len(piece)
    whole = b"".join(pieces())
    assert writer.written == len(whole)
    assert writer.digest.hexdigest() == hashlib.sha256(whole).hexdigest()  # reading the digest passes the rest on
    assert out.getvalue() == whole


def test_flush_passes_on_what_is_gathered() -> None:
    out = io.BytesIO()
    writer = HashingWriter(out)
    writer.write(b"abc")
    assert out.getvalue() == b""  # gathered, not written yet
    writer.flush()
    assert out.getvalue() == b"abc"


class FullDisk(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_is_kept_and_raised_when_the_gathered_bytes_go_out() -> None:
    writer = HashingWriter(FullDisk())
    writer.write(b"x" * 10)  # gathered: nothing reached the file yet
    with pytest.raises(OSError) as caught:
        writer.flush()
    assert caught.value.errno == errno.ENOSPC and writer.failure is caught.value
