"""Masked CRC-32C of many byte strings at once, as TFRecord frames TensorBoard events.

tensorboardX computes each CRC in a Python loop over the bytes (~0.1 µs a
byte without the optional compiled ``crc32c`` package). A flush writes a
kilobyte or two of records; here their CRCs come from a handful of numpy
calls for the whole flush, and the few numpy calls matter more than the
bytes: inside a training run the caches are cold, and each call costs several
µs there.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any, Sequence


def masked_crc32c(chunks: Sequence[bytes]) -> list[int]:
    """The masked CRC-32C that TFRecord stores after each length and each record, for every chunk.

    >>> from tensorboardX.record_writer import masked_crc32c as one
    >>> masked_crc32c([b"123456789", b"x"]) == [one(b"123456789"), one(b"x")]
    True
    """
    longest = max(map(len, chunks), default=0)
    if not chunks or longest > _Crc32c.LONGEST or not all(chunks) or _native_crc():
        from tensorboardX.record_writer import masked_crc32c as one

        return [one(chunk) for chunk in chunks]
    global _CRC32C
    if _CRC32C is None:
        _CRC32C = _Crc32c()
    return _CRC32C.masked(chunks, longest)


def _native_crc() -> bool:
    """Whether tensorboardX computes CRCs with the compiled ``crc32c`` package."""
    from tensorboardX import crc32c

    return getattr(crc32c, "_crc32c_native", None) is not None


class _Crc32c:
    """CRC-32C of many byte strings at once, with numpy.

    CRC is linear over GF(2): a message's CRC is the XOR of one table entry per
    byte, looked up by the byte and its distance from the end of the message,
    and of the CRC of as many zero bytes (which carries the initial value).
    """

    LONGEST = 4096  # longer records (an event with thousands of tags) use tensorboardX's loop
    POLY = 0x82F63B78  # reflected Castagnoli polynomial

    def __init__(self) -> None:
        import numpy as np

        self._np = np
        byte = np.arange(256, dtype=np.uint32)
        for _ in range(8):
            byte = np.where(byte & 1, (byte >> 1) ^ np.uint32(self.POLY), byte >> 1)
        self._byte = byte
        self._rows = 0
        self._table: Any = None  # flat: entry d * 256 + b is byte b followed by d zero bytes, from a zero register
        self._offsets: Any = None  # offsets[rows - 1 - d] == d * 256: a message's row offsets are one slice
        self._zeros = [0]  # zeros[n]: CRC of n zero bytes from the initial register, already ^ 0xFFFFFFFF
        self._grow(64)

    def _grow(self, rows: int) -> None:
        """Extend the table to messages of ``rows`` bytes (doubling, so it is rebuilt rarely)."""
        np = self._np
        rows = max(rows, 2 * self._rows)
        table = [self._byte]
        for _ in range(rows - 1):
            row = table[-1]
            table.append(self._byte[row & 0xFF] ^ (row >> 8))
        self._table = np.concatenate(table)
        self._offsets = np.arange(rows - 1, -1, -1, dtype=np.intp) * 256
        self._rows = rows
        byte, zeros = self._byte.tolist(), self._zeros
        register = zeros[-1] ^ 0xFFFFFFFF
        for _ in range(len(zeros), rows + 1):
            register = byte[register & 0xFF] ^ (register >> 8)
            zeros.append(register ^ 0xFFFFFFFF)

    def masked(self, chunks: Sequence[bytes], longest: int) -> list[int]:
        np = self._np
        if longest > self._rows:
            self._grow(longest)
        lengths = [len(chunk) for chunk in chunks]
        offsets, rows = self._offsets, self._rows
        index = np.concatenate([offsets[rows - n:] for n in lengths])
        index += np.frombuffer(b"".join(chunks), dtype=np.uint8)
        starts = list(accumulate(lengths[:-1], initial=0))
        crcs = np.bitwise_xor.reduceat(self._table.take(index), starts).tolist()
        zeros = self._zeros
        # The mask TFRecord applies: rotate right by 15 bits, add a constant (bits above 32 dropped).
        return [
            ((((crc ^ zeros[n]) >> 15) | ((crc ^ zeros[n]) << 17)) + 0xA282EAD8) & 0xFFFFFFFF
            for crc, n in zip(crcs, lengths)
        ]


_CRC32C: _Crc32c | None = None  # built on first use: nothing happens at import
