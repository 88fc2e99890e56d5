"""Writing TensorBoard events in batches: one event per step, one file write per flush.

tensorboardX's ``add_scalar`` puts every value through a multiprocessing queue
(~45 µs each); logging a step's loss and learning rates that way costs more
than a small model's whole training step. Here a flush encodes each step's
scalars as one ``Event`` protobuf by hand, and any histograms after them
(``handlers.event_encoding``: tests check the bytes equal the protobuf
library's and tensorboardX's), frames them as TFRecords with masked CRC-32C
(``handlers.record_crc``, checked against tensorboardX's) and appends them to
the writer's open event file under its lock in one write. A writer that is
not a tensorboardX ``SummaryWriter`` (or whose internals differ) gets plain
``add_scalar``/``add_histogram`` calls instead.
"""

from __future__ import annotations

import struct
import time
from typing import Any, Sequence

import torch

from handlers.event_encoding import BucketEdges, histogram_event, scalar_event
from handlers.record_crc import masked_crc32c

# (optimizer step, wall time, [(tag, value), ...]): the scalars of one TensorBoard event.
ScalarRow = tuple[int, float, Sequence[tuple[str, float]]]
# (optimizer step, wall time, tag, values, bins): one histogram event.
HistogramRow = tuple[int, float, str, Sequence[float], Any]


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
    write_summaries(writer, rows)


def write_summaries(writer: Any, scalars: Sequence[ScalarRow], histograms: Sequence[HistogramRow] = ()) -> None:
    """Write scalar rows (as ``write_scalars``) and then histograms, in one file write.

    A histogram row is ``(step, wall_time, tag, values, bins)``, with ``bins``
    as ``SummaryWriter.add_histogram`` takes it ('tensorflow' for the writer's
    fixed bucket edges, another numpy binning name, or a number of bins) and
    ``values`` finite. A histogram none of whose values lies within the
    'tensorflow' edges (beyond ±1e20) is left out: tensorboardX would raise.
    Writers other than a plain SummaryWriter get ``add_scalar`` and
    ``add_histogram`` calls, as in ``write_scalars``.

    >>> class Printer:
    ...     def add_scalar(self, tag, value, step):
    ...         print(tag, value, step)
    ...     def add_histogram(self, tag, values, step, bins):
    ...         print(tag, values.tolist(), step, bins)
    >>> write_summaries(Printer(), [(2, 0.0, [("norm", 0.5)])], [(2, 0.0, "norms", [0.5, 0.25], 3)])
    norm 0.5 2
    norms [0.5, 0.25] 2 3
    """
    if not scalars and not histograms:
        return
    events_writer = _events_writer(writer)
    if events_writer is None:
        for step, _, values in scalars:
            for tag, value in values:
                writer.add_scalar(tag, value, step)
        for step, _, tag, points, bins in histograms:
            writer.add_histogram(tag, torch.tensor(points), step, bins=bins)
        return
    records = [scalar_event(step, wall_time, values) for step, wall_time, values in scalars]
    for step, wall_time, tag, points, bins in histograms:
        if isinstance(bins, str) and bins == "tensorflow":
            bins = _tensorflow_edges(writer.default_bins)
        record = histogram_event(step, wall_time, tag, points, bins)
        if record is not None:
            records.append(record)
    if records:
        _append_records(events_writer, records)


def _tensorflow_edges(default_bins: Sequence[float]) -> BucketEdges:
    """``SummaryWriter.default_bins`` as ``BucketEdges``, converted once (every writer has the same list)."""
    global _TENSORFLOW_EDGES
    cached = _TENSORFLOW_EDGES
    if cached is None or (cached[0] is not default_bins and cached[0] != default_bins):
        cached = (default_bins, BucketEdges(default_bins))
    _TENSORFLOW_EDGES = (default_bins, cached[1])  # the next call of this writer compares identities only
    return cached[1]


_TENSORFLOW_EDGES: tuple[Sequence[float], BucketEdges] | None = None


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


def write_texts(writer: Any, rows: Sequence[tuple[int, str, str]]) -> None:
    """Write each ``(step, tag, text)`` as the event ``add_text(tag, text, step)`` writes, in one file write.

    Directly, like the scalars: ``add_text`` would start tensorboardX's queue
    threads for a handful of texts. Any other writer (or one feeding comet.ml)
    gets one ``add_text`` call per row.

    >>> class Printer:
    ...     def add_text(self, tag, text, step):
    ...         print(tag, text, step)
    >>> write_texts(Printer(), [(3, "doctor/eval-mode", "a line")])
    doctor/eval-mode a line 3
    """
    events_writer = _events_writer(writer) if rows else None
    if events_writer is None:
        for step, tag, text in rows:
            writer.add_text(tag, text, step)
        return
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.summary import text as text_summary

    now = time.time()
    _append_records(events_writer, [Event(step=int(step), wall_time=now, summary=text_summary(tag, text))
                                    .SerializeToString() for step, tag, text in rows])


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
    new_sizes = [size for size in {len(record) for record in records} if size not in headers]
    new_headers = [struct.pack("<Q", size) for size in new_sizes]
    crcs = masked_crc32c([*records, *new_headers])  # one pass for the records and any new length headers
    pack = _UINT32
    for size, header, crc in zip(new_sizes, new_headers, crcs[len(records):]):
        headers[size] = header + pack(crc)
    data = b"".join([headers[len(record)] + record + pack(crc) for record, crc in zip(records, crcs)])
    with events_writer._lock:  # the lock tensorboardX's writer thread takes for each record
        events_writer._py_recordio_writer._writer.write(data)


_HEADERS: dict[int, bytes] = {}  # record length -> the length and its CRC, as TFRecord writes them
_UINT32 = struct.Struct("<I").pack
