"""Hand-encoded histogram events: the bytes tensorboardX and the protobuf library write, and one write per flush."""

from __future__ import annotations

import numpy as np
import pytest
from tensorboardX import SummaryWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.summary import histogram

from handlers.event_encoding import BucketEdges, histogram_event
from handlers.event_file import write_summaries


def tensorflow_edges(tmp_path) -> list:
    """A SummaryWriter's own 'tensorflow' bucket edges."""
    writer = SummaryWriter(logdir=str(tmp_path))
    writer.close()
    return writer.default_bins


def expected_event(step, wall_time, tag, values, bins) -> bytes:
    return Event(step=step, wall_time=wall_time, summary=histogram(tag, np.asarray(values), bins)).SerializeToString()


CASES = [
    [0.75],  # one value
    [3.0, 3.0, 3.0, 3.0],  # all equal
    [0.0],
    [-0.0, 0.0],
    [0.0, -0.0, 1.0],
    [-3.0, -0.0],  # 0.0 and -0.0: min and max as numpy picks them
    [-2.5, -1e-13, 1e-13, 0.0, 4.0],  # negative values, around the innermost edges
    [1e-300, 5e-13, 2.0],  # below the smallest positive edge
    [0.5, 1.25, 2.0, 7.0, 1e5, 3.3e-6] * 5,
    list(np.random.default_rng(0).lognormal(0.0, 3.0, 64)),
    list(np.random.default_rng(1).normal(0.0, 1e10, 25)),
    [1e21, 2.0, -3e25],  # beyond the outermost edges (±9.9e19): in the stats, in no bucket
]


@pytest.mark.parametrize("values", CASES)
def test_tensorflow_bins_histogram_is_what_tensorboardx_writes(tmp_path, values):
    edges = tensorflow_edges(tmp_path)
    expected = expected_event(12, 1.7e9, "grad_norm/histogram", values, edges)
    assert histogram_event(12, 1.7e9, "grad_norm/histogram", values, BucketEdges(edges)) == expected
    assert histogram_event(12, 1.7e9, "grad_norm/histogram", values, edges) == expected


@pytest.mark.parametrize("values", CASES)
@pytest.mark.parametrize("bins", [1, 5, 30, "auto"])
def test_integer_and_named_bins_histogram_is_what_tensorboardx_writes(values, bins):
    expected = expected_event(3, 2.5, "h", values, bins)
    assert histogram_event(3, 2.5, "h", values, bins) == expected


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy's, for tensorboardX too
def test_edges_on_bucket_boundaries_and_cleaned_tags_and_zero_step():
    edges = [-1.0, 0.0, 0.0, 1.0, 2.0, 2.0]  # repeated edges: numpy's empty buckets
    # The last: finite values whose sum and sum of squares overflow to infinity, as numpy's do.
    for values in ([-1.0, 0.0, 1.0, 2.0], [2.0], [-1.0], [0.0, 0.0], [-3.0, 1.0, 9.0], [1e308, 1e308, 1.5]):
        assert histogram_event(0, 0.0, "a b/(c)", values, edges) == expected_event(0, 0.0, "a b/(c)", values, edges)


def test_nothing_within_the_edges_gives_no_event_where_tensorboardx_raises(tmp_path):
    edges = tensorflow_edges(tmp_path)
    with pytest.raises(ValueError):
        histogram("h", np.array([1e21, -1e22]), edges)
    assert histogram_event(1, 1.0, "h", [1e21, -1e22], edges) is None


@pytest.mark.parametrize("values, match", [([], "no values"), ([1.0, float("nan"), 2.0], "non-finite"),
                                           ([float("inf")], "non-finite")])
def test_bad_values_are_refused(values, match):
    with pytest.raises(ValueError, match=match):
        histogram_event(1, 1.0, "h", values, 5)


@pytest.mark.parametrize("edges", [[1.0], [0.0, 2.0, 1.0]])
def test_bad_edges_are_refused(edges):
    with pytest.raises(ValueError, match="To fix"):
        BucketEdges(edges)


def test_scalars_and_histograms_of_a_flush_land_in_one_write_in_order(tmp_path, monkeypatch):
    from tests.handlers.test_tensorboard import read_events

    import handlers.event_file as event_file

    writer = SummaryWriter(logdir=str(tmp_path))
    appends = []
    append = event_file._append_records
    monkeypatch.setattr(
        event_file, "_append_records", lambda ev, records: (appends.append(len(records)), append(ev, records))
    )
    scalars = [(1, 10.0, [("norm", 0.5)]), (2, 11.0, [("norm", 0.25), ("fraction", 0.5)])]
    write_summaries(writer, scalars, [(2, 11.0, "norms", [0.5, 0.25], "tensorflow"), (2, 11.0, "far", [1e30, 2e30], 5)])
    writer.close()
    assert appends == [4]
    events = [e for e in read_events(tmp_path) if e.HasField("summary")]
    assert [(e.step, [v.tag for v in e.summary.value]) for e in events] == [
        (1, ["norm"]), (2, ["norm", "fraction"]), (2, ["norms"]), (2, ["far"])
    ]
    assert events[2].SerializeToString() == expected_event(2, 11.0, "norms", [0.5, 0.25], writer.default_bins)


def test_crcs_match_tensorboardx_when_a_flush_repeats_or_extends_the_last_ones_lengths():
    import random

    from tensorboardX.record_writer import masked_crc32c as one

    from handlers.record_crc import masked_crc32c

    rng = random.Random(3)

    def chunk(n: int) -> bytes:
        return bytes(rng.randrange(256) for _ in range(n))

    steps = [chunk(50) for _ in range(6)]
    for last in (170, 170, 187, 9, 170):  # the same lengths again, then a different last record each time
        chunks = [chunk(50) for _ in range(6)] + [chunk(last)]
        assert masked_crc32c(chunks) == [one(c) for c in chunks]
        assert masked_crc32c(steps) == [one(c) for c in steps]
    longer = [chunk(900), chunk(1), chunk(2500)]  # beyond the table built so far
    assert masked_crc32c(longer) == [one(c) for c in longer]


def test_scalar_events_are_what_protobuf_writes_for_every_varint_size():
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.summary import _clean_tag

    from handlers.event_encoding import scalar_event

    rows = [
        (step, wall_time, values)
        for step in (0, 1, 127, 128, 16383, 16384, 2**40, -3)  # one, two and more varint bytes; zero left out
        for wall_time in (0.0, 1.7e9)
        for values in ([("train/loss", 0.5), ("lr/group0", 1e-3)], [("big", 1e39), ("nan", float("nan"))], [],
                       [("t" * 130, -0.0)])  # a value entry longer than 127 bytes
    ]
    expected = [
        Event(step=step, wall_time=wall_time, summary=Summary(
            value=[Summary.Value(tag=_clean_tag(tag), simple_value=value) for tag, value in values]
        )).SerializeToString()
        for step, wall_time, values in rows
    ]
    assert [scalar_event(*row) for row in rows] == expected
