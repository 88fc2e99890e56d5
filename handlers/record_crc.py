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
    lengths = list(map(len, chunks))
    if not chunks or not min(lengths) or max(lengths) > _Crc32c.LONGEST or _native_crc():
        from tensorboardX.record_writer import masked_crc32c as one

        return [one(chunk) for chunk in chunks]
    global _CRC32C
    if _CRC32C is None:
        _CRC32C = _Crc32c()
    return _CRC32C.masked(chunks, lengths)


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
        self._zeros = [0]  # zeros[n]: CRC of n zero bytes from the initial register, already ^ 0xFFFFFFFF
        self._layouts: dict[tuple[int, ...], tuple[Any, Any]] = {}  # by chunk lengths: see _layout
        self._ramp_cache = np.zeros(0, dtype=np.intp)
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
        self._rows = rows
        byte, zeros = self._byte.tolist(), self._zeros
        register = zeros[-1] ^ 0xFFFFFFFF
        for _ in range(len(zeros), rows + 1):
            register = byte[register & 0xFF] ^ (register >> 8)
            zeros.append(register ^ 0xFFFFFFFF)

    def masked(self, chunks: Sequence[bytes], lengths: list[int]) -> list[int]:
        """The masked CRCs of ``chunks`` (none empty, none longer than ``LONGEST``), of ``lengths`` bytes."""
        np = self._np
        longest = max(lengths)
        if longest > self._rows:
            self._grow(longest)
        base, starts = self._layout_of(lengths)
        index = np.add(base, np.frombuffer(b"".join(chunks), dtype=np.uint8))
        crcs = np.bitwise_xor.reduceat(self._table.take(index), starts).tolist()
        zeros = self._zeros
        # The mask TFRecord applies: rotate right by 15 bits, add a constant (bits above 32 dropped).
        return [
            ((((crc ^ zeros[n]) >> 15) | ((crc ^ zeros[n]) << 17)) + 0xA282EAD8) & 0xFFFFFFFF
            for crc, n in zip(crcs, lengths)
        ]

    def _layout_of(self, lengths: list[int]) -> tuple[Any, Any]:
        """``_layout(lengths)``, kept for the next flush: its records mostly have the same lengths.

        The last record may differ (a histogram's buckets vary): the layout of
        the others is kept too, and extended by the last one's offsets.
        """
        layouts = self._layouts
        key = tuple(lengths)
        layout = layouts.get(key)
        if layout is None:
            if len(layouts) >= 32:
                layouts.clear()
            head = layouts.get(key[:-1]) if len(key) > 1 else None
            if head is None:
                layout = self._layout(lengths)
                if len(key) > 1:
                    layouts[key[:-1]] = self._layout(lengths[:-1])
            else:
                np, head_base, last = self._np, head[0], lengths[-1]
                ramp = self._ramp(last)
                layout = (np.concatenate([head_base, ramp[::-1]]), np.append(head[1], len(head_base)))
            layouts[key] = layout
        return layout

    def _layout(self, lengths: list[int]) -> tuple[Any, Any]:
        """Each byte's table row offset (256 x its distance from its chunk's end) and each chunk's start."""
        np = self._np
        ends = list(accumulate(lengths))
        # distance = end - 1 - position: the chunk's last offset repeated over its bytes, minus a ramp.
        base = np.repeat([256 * (end - 1) for end in ends], lengths) - self._ramp(ends[-1])
        return base, np.array([0, *ends[:-1]], dtype=np.intp)

    def _ramp(self, size: int) -> Any:
        if len(self._ramp_cache) < size:
            self._ramp_cache = self._np.arange(max(size, 2 * len(self._ramp_cache)), dtype=self._np.intp) * 256
        return self._ramp_cache[:size]


_CRC32C: _Crc32c | None = None  # built on first use: nothing happens at import
