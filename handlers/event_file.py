"""Writing TensorBoard events in batches: one event per step, one file write per flush.

tensorboardX's ``add_scalar`` puts every value through a multiprocessing queue
(~45 µs each); logging a step's loss and learning rates that way costs more
than a small model's whole training step. Here a flush encodes each step's
scalars as one ``Event`` protobuf by hand (a test checks the bytes equal the
protobuf library's), frames them as TFRecords with masked CRC-32C (checked
against tensorboardX's) and appends them to the writer's open event file under
its lock in one write. A writer that is not a tensorboardX ``SummaryWriter``
(or whose internals differ) gets plain ``add_scalar`` calls instead.
"""

from __future__ import annotations

import math
import struct
import time
from typing import Any, Sequence

import torch

# (optimizer step, wall time, [(tag, value), ...]): the scalars of one TensorBoard event.
ScalarRow = tuple[int, float, Sequence[tuple[str, float]]]


def write_scalars(writer: Any, rows: Sequence[ScalarRow]) -> None:
    """Write each ``(step, wall_time, [(tag, value), ...])`` row as one TensorBoard event.

    To a tensorboardX ``SummaryWriter`` the events are appended to its open
    event file in one write from this thread: ``add_scalar`` would push every
    value through tensorboardX's writer queue, a ``multiprocessing.Queue``
    (pickling, a pipe and a thread hand-off: 30-50 µs a value). The writer's
    lock keeps records whole; events queued earlier by ``add_scalar`` may land
    after these, which TensorBoard does not mind (it orders points by step,
    per tag). Any other writer (or a SummaryWriter that also feeds comet.ml)
    gets one ``add_scalar(tag, value, step)`` per value.

    >>> class Printer:
    ...     def add_scalar(self, tag, value, step):
    ...         print(tag, value, step)
    >>> write_scalars(Printer(), [(1, 0.0, [("train/loss", 0.5), ("lr/group0", 0.1)])])
    train/loss 0.5 1
    lr/group0 0.1 1
    """
    if not rows:
        return
    events_writer = _events_writer(writer)
    if events_writer is None:
        for step, _, values in rows:
            for tag, value in values:
                writer.add_scalar(tag, value, step)
        return
    _append_records(events_writer, [scalar_event(step, wall_time, values) for step, wall_time, values in rows])


def write_histogram(writer: Any, tag: str, values: Sequence[float], step: int, bins: str | int) -> None:
    """``writer.add_histogram(tag, values, step, bins=bins)``, written to a SummaryWriter like ``write_scalars``."""
    events_writer = _events_writer(writer)
    if events_writer is None:
        writer.add_histogram(tag, torch.tensor(values), step, bins=bins)
        return
    import numpy as np
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.summary import histogram

    if bins == "tensorflow":  # the SummaryWriter's fixed bucket edges, converted to numpy once
        global _TENSORFLOW_BINS
        if _TENSORFLOW_BINS is None:
            _TENSORFLOW_BINS = np.asarray(writer.default_bins, dtype=float)
        bins = _TENSORFLOW_BINS
    summary = histogram(tag, np.asarray(values, dtype=float), bins)
    _append_records(events_writer, [Event(step=step, wall_time=time.time(), summary=summary).SerializeToString()])


_TENSORFLOW_BINS: Any = None


def scalar_event(step: int, wall_time: float, values: Sequence[tuple[str, float]]) -> bytes:
    """The serialized ``Event(step, wall_time, summary=Summary(value=[Value(tag, simple_value), ...]))``.

    Encoded by hand, byte for byte what protobuf writes, in a third of the
    time it takes to build the messages (tags cleaned as tensorboardX does).

    >>> from tensorboardX.proto.event_pb2 import Event
    >>> event = Event.FromString(scalar_event(7, 1.5, [("train/loss", 0.25)]))
    >>> event.step, event.wall_time, event.summary.value[0].tag, event.summary.value[0].simple_value
    (7, 1.5, 'train/loss', 0.25)
    """
    prefixes = _VALUE_PREFIXES
    try:
        summary = b"".join([(prefixes.get(tag) or _value_prefix(tag)) + _FLOAT(value) for tag, value in values])
    except OverflowError:  # beyond float32: protobuf stores an infinity
        summary = b"".join([_value_prefix(tag) + _float32(value) for tag, value in values])
    head = b"\x09" + _DOUBLE(wall_time) if wall_time else b""  # proto3 leaves out zeros
    if step:
        head += b"\x10" + _varint(step)
    return head + b"\x2a" + _varint(len(summary)) + summary


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]
_DOUBLE = struct.Struct("<d").pack
_FLOAT = struct.Struct("<f").pack
_VALUE_PREFIXES: dict[str, bytes] = {}


def _value_prefix(tag: str) -> bytes:
    """A ``Summary.value`` entry up to its float: field 1 (length), ``tag`` (field 1), field 2's key."""
    prefix = _VALUE_PREFIXES.get(tag)
    if prefix is None:
        from tensorboardX.summary import _clean_tag

        name = _clean_tag(tag).encode("utf-8")
        entry = b"\x0a" + _varint(len(name)) + name + b"\x15"
        prefix = _VALUE_PREFIXES[tag] = b"\x0a" + _varint(len(entry) + 4) + entry
    return prefix


def _float32(value: float) -> bytes:
    try:
        return _FLOAT(value)
    except OverflowError:
        return _FLOAT(math.copysign(math.inf, value))


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _ONE_BYTE[n]
    n &= 0xFFFFFFFFFFFFFFFF  # int64 as protobuf writes it (a negative one takes 10 bytes)
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def write_purge_marker(writer: Any, step: int) -> None:
    """Open a new event file for ``writer`` that starts with a purge marker at ``step``.

    TensorBoard drops the points at ``step`` and after that it read before the
    marker. Written directly, like the scalars, so none of them can precede it.
    """
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    now = time.time()
    events = [
        Event(step=step, wall_time=now, file_version="brain.Event:2"),
        Event(step=step, wall_time=now, session_log=SessionLog(status=SessionLog.START)),
    ]
    events_writer = _events_writer(writer, marker=True)
    if events_writer is not None:
        _append_records(events_writer, [event.SerializeToString() for event in events])
    else:  # a tensorboardX without the internals used here: its queue keeps every write in order
        file_writer = writer._get_file_writer()
        for event in events:
            file_writer.add_event(event, step, now)


def _events_writer(writer: Any, *, marker: bool = False) -> Any:
    """tensorboardX's ``EventsWriter`` behind ``writer`` (reopened if closed), or None to use its methods."""
    open_file_writer = getattr(writer, "_get_file_writer", None)
    if open_file_writer is None:
        return None
    comet = getattr(writer, "_get_comet_logger", None)
    if not marker and comet is not None and getattr(comet(), "_logging", False) is not False:
        return None  # comet.ml logging is on: only add_scalar/add_histogram feed it
    events_writer = getattr(getattr(open_file_writer(), "event_writer", None), "_ev_writer", None)
    records = getattr(events_writer, "_py_recordio_writer", None)
    if getattr(records, "_writer", None) is None or not hasattr(events_writer, "_lock"):
        return None
    return events_writer


def _append_records(events_writer: Any, records: Sequence[bytes]) -> None:
    """Append serialized events as TFRecords (length, its CRC, data, its CRC) in a single file write."""
    headers = _HEADERS
    for size in {len(record) for record in records} - headers.keys():
        header = struct.pack("<Q", size)
        headers[size] = header + struct.pack("<I", masked_crc32c([header])[0])
    pack = _UINT32
    data = b"".join([
        headers[len(record)] + record + pack(crc) for record, crc in zip(records, masked_crc32c(records))
    ])
    with events_writer._lock:  # the lock tensorboardX's writer thread takes for each record
        events_writer._py_recordio_writer._writer.write(data)


_HEADERS: dict[int, bytes] = {}  # record length -> the length and its CRC, as TFRecord writes them
_UINT32 = struct.Struct("<I").pack


def masked_crc32c(chunks: Sequence[bytes]) -> list[int]:
    """The masked CRC-32C that TFRecord stores after each length and each record, for every chunk.

    tensorboardX computes it in a Python loop over the bytes (~0.1 µs a byte
    without the optional ``crc32c`` package); this computes a whole flush at once.

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
        self._byte = byte.tolist()
        self._rows = [byte]  # _rows[d][b]: byte b followed by d zero bytes, from a zero register
        self._table = byte[None, :]
        self._zeros: dict[int, int] = {}

    def _zeros_crc(self, n: int) -> int:
        crc = self._zeros.get(n)
        if crc is None:
            register = 0xFFFFFFFF
            for _ in range(n):
                register = self._byte[register & 0xFF] ^ (register >> 8)
            crc = self._zeros[n] = register ^ 0xFFFFFFFF
        return crc

    def masked(self, chunks: Sequence[bytes], longest: int) -> list[int]:
        np = self._np
        if longest > len(self._rows):
            byte = self._rows[0]
            while len(self._rows) < longest:
                row = self._rows[-1]
                self._rows.append(byte[row & 0xFF] ^ (row >> 8))
            self._table = np.stack(self._rows)
        lengths = np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))
        ends = np.cumsum(lengths)
        data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        distance = np.repeat(ends - 1, lengths) - np.arange(int(ends[-1]))
        crc = np.bitwise_xor.reduceat(self._table[distance, data], ends - lengths)
        zeros = self._zeros
        crc ^= np.array([zeros[n] if n in zeros else self._zeros_crc(n) for n in lengths.tolist()], dtype=np.uint32)
        crc = crc.astype(np.uint64)
        return ((((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF).tolist()


_CRC32C: _Crc32c | None = None  # built on first use: nothing happens at import


