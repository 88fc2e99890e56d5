"""A checkpoint's self-description: the record sealed inside every ``.ekpt`` file.

The record holds everything the directory's index knows about a file (its
name, step, epoch, metric, tags at creation, creation order within the
directory, run identity and creation time). It is written as compact JSON
between the ``torch.save`` archive and the trailer, inside the region the
file's SHA-256 covers, so the index can always be rebuilt from the files
that verify, and an index entry that disagrees with its file is detected.

JSON has no NaN: a non-finite metric is stored as ``"nan"``, ``"inf"`` or
``"-inf"`` (the same encoding the index uses).

>>> record = CheckpointRecord("step00000004-00001.ekpt", step=4, epoch=1, order=1, metric=float("inf"))
>>> CheckpointRecord.from_bytes(record.to_bytes()) == record
True
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

RECORD_FORMAT_VERSION = 1
MAX_RECORD_BYTES = 1 << 20  # a name, a few numbers and tags; anything larger is not ours
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def encode_metric(metric: float | None) -> float | str | None:
    """A JSON-safe metric: non-finite values as strings.

    >>> encode_metric(float("-inf")), encode_metric(0.5), encode_metric(None)
    ('-inf', 0.5, None)
    """
    if metric is None or math.isfinite(metric):
        return metric
    return "nan" if math.isnan(metric) else ("inf" if metric > 0 else "-inf")


def decode_metric(value: object) -> float | None:
    """Inverse of :func:`encode_metric`; ValueError for anything else.

    >>> decode_metric("inf"), decode_metric(2)
    (inf, 2.0)
    """
    if value is None:
        return None
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"metric {value!r} is not a number, null, 'nan', 'inf' or '-inf'")


def require_count(obj: dict[str, Any], key: str, default: Any = ...) -> int:
    """``obj[key]`` as an integer >= 0 (``default`` when absent, if given); ValueError otherwise.

    >>> require_count({"step": 3}, "step")
    3
    """
    if default is not ... and key not in obj:
        return default
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} {value!r} is not an integer >= 0")
    return value


def require_tags(value: object) -> tuple[str, ...]:
    """A list of strings as a tuple; ValueError otherwise."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(tag, str) for tag in value):
        raise ValueError(f"tags {value!r} is not a list of strings")
    return tuple(value)


def require_time(value: object) -> float:
    """A finite number of seconds; ValueError otherwise."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"created {value!r} is not a finite number")
    return float(value)


def require_run_id(value: object) -> str | None:
    """A run identity: a string or None; ValueError otherwise."""
    if value is not None and not isinstance(value, str):
        raise ValueError(f"run_id {value!r} is not a string or null")
    return value


# What a file's record and its index entry both say about a checkpoint.
SHARED_FIELDS = ("name", "step", "epoch", "order", "tags", "metric", "run_id", "created")


def shared_to_json(described: Any) -> dict[str, Any]:
    """The :data:`SHARED_FIELDS` of a record or index entry as JSON-safe values."""
    document = {field: getattr(described, field) for field in SHARED_FIELDS}
    document["tags"] = list(described.tags)
    document["metric"] = encode_metric(described.metric)
    return document


def shared_from_json(document: dict[str, Any], *, order_default: Any = ...) -> dict[str, Any]:
    """Validated keyword arguments for the :data:`SHARED_FIELDS`; ValueError with the reason otherwise.

    >>> shared_from_json({"name": "a.ekpt", "step": 1, "epoch": 0, "order": 2})["order"]
    2
    """
    name = document.get("name")
    if not isinstance(name, str):
        raise ValueError(f"name {name!r} is not a string")
    return {
        "name": name,
        "step": require_count(document, "step"),
        "epoch": require_count(document, "epoch"),
        "order": require_count(document, "order", order_default),
        "tags": require_tags(document.get("tags", [])),
        "metric": decode_metric(document.get("metric")),
        "run_id": require_run_id(document.get("run_id")),
        "created": require_time(document.get("created", 0.0)),
    }


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    """What a checkpoint file says about itself.

    Attributes:
        name: the file name it was committed under.
        step: the training step it captures.
        epoch: the epoch it captures.
        order: its creation order in the directory (1, 2, ...; unique, increasing).
        tags: labels it was committed with (the index may retag later).
        metric: the score it was ranked by (may be NaN/inf), or None.
        run_id: the identity of the run that wrote it, or None.
        created: ``time.time()`` at commit.
    """

    name: str
    step: int
    epoch: int
    order: int
    tags: tuple[str, ...] = ()
    metric: float | None = None
    run_id: str | None = None
    created: float = 0.0

    def to_bytes(self) -> bytes:
        """Compact, canonical JSON (sorted keys) for sealing into the file."""
        document = {"record_version": RECORD_FORMAT_VERSION, **shared_to_json(self)}
        return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> CheckpointRecord:
        """Parse and validate a sealed record; ValueError with the reason otherwise."""
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"its record is {len(data)} bytes, more than the {MAX_RECORD_BYTES} engine_kit writes")
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"its record is not JSON ({exc})") from exc
        if not isinstance(document, dict):
            raise ValueError(f"its record is a {type(document).__name__}, not an object")
        version = document.get("record_version")
        if version != RECORD_FORMAT_VERSION:
            raise ValueError(f"its record has record_version={version!r}; this engine_kit reads {RECORD_FORMAT_VERSION}")
        try:
            return cls(**shared_from_json(document))
        except ValueError as exc:
            raise ValueError(f"its record is invalid: {exc}") from exc
