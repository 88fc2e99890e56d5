"""The registry of committed checkpoints: ``registry.json`` in the directory.

A checkpoint exists only once the registry lists it, with the SHA-256 of its
file. The registry is rewritten whole with :func:`atomic_write`, so a crash
leaves either the old or the new list. Its JSON::

    {"format_version": 1,
     "entries": [{"name": "step-000100.ekpt", "sha256": "<64 hex>", "size": 1234,
                  "step": 100, "epoch": 2, "tags": ["last"], "metric": 0.25,
                  "created": 1700000000.0}, ...],
     "pending_delete": ["step-000050.ekpt"]}

JSON has no NaN: a non-finite metric is stored as the string ``"nan"``,
``"inf"`` or ``"-inf"``. Names are checked when written *and* when read: an
entry whose name could reach outside the directory (``../x``, ``/abs``, a
symlinked path) is dropped with a warning and never acted on.

``pending_delete`` lists names rotation has unregistered but maybe not yet
unlinked; the directory finishes those deletions after a crash, so a kill
between "unregister" and "unlink" cannot leak a whole checkpoint.

>>> validate_name("step-000001.ekpt")
'step-000001.ekpt'
>>> validate_name("../outside.ekpt")
Traceback (most recent call last):
...
ValueError: Checkpoint name '../outside.ekpt' is not a plain file name: it contains '/'. To fix: pass a bare name such as 'step-000100.ekpt'.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from typing import Any, NamedTuple

from engine_kit.checkpoint.atomic import atomic_write
from engine_kit.errors import CheckpointCorruptError, fix_message

REGISTRY_NAME = "registry.json"
REGISTRY_FORMAT_VERSION = 1
CHECKPOINT_SUFFIX = ".ekpt"
MAX_NAME_BYTES = 255

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_NAME_FIX = "pass a bare name such as 'step-000100.ekpt'."


def validate_name(name: object) -> str:
    """Return ``name`` if it is a plain ``*.ekpt`` file name, else raise.

    Args:
        name: the candidate checkpoint file name.

    Raises:
        ValueError: a separator, ``..``, NUL, a leading dot, an absolute
            path, more than 255 bytes, or a suffix other than ``.ekpt``.
        TypeError: ``name`` is not a str.
    """
    if not isinstance(name, str):
        raise TypeError(fix_message(f"Checkpoint name must be a str, got {type(name).__name__} {name!r}.", _NAME_FIX))
    problem = None
    for bad in ("/", "\\", "\0", ".."):
        if bad in name:
            problem = f"it contains {bad!r}"
            break
    else:
        if not name or name.startswith("."):
            problem = "it is empty or starts with '.'"
        elif os.path.isabs(name):
            problem = "it is an absolute path"
        elif len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            problem = f"it is {len(name.encode('utf-8', 'surrogatepass'))} bytes long (limit {MAX_NAME_BYTES})"
        elif not name.endswith(CHECKPOINT_SUFFIX) or name == CHECKPOINT_SUFFIX:
            problem = f"it does not end with {CHECKPOINT_SUFFIX!r}"
    if problem is not None:
        shown = name if len(name) <= 80 else name[:40] + "..." + name[-20:]
        raise ValueError(fix_message(f"Checkpoint name {shown!r} is not a plain file name: {problem}.", _NAME_FIX))
    return name


def resolve_inside(directory: str | os.PathLike[str], name: str) -> str:
    """The path of ``name`` in ``directory``, checked to stay inside it.

    Args:
        directory: the checkpoint directory.
        name: a name that passed :func:`validate_name`.

    Returns:
        ``directory/name`` (not resolved: callers ``lstat`` it themselves).

    Raises:
        ValueError: ``realpath(directory/name)`` lies outside
            ``realpath(directory)`` (e.g. the name is a symlink to elsewhere).
    """
    validate_name(name)
    root = os.path.realpath(os.fspath(directory))
    target = os.path.realpath(os.path.join(root, name))
    if os.path.dirname(target) != root:
        raise ValueError(
            fix_message(
                f"Checkpoint {name!r} resolves to {target!r}, outside the directory {root!r}.",
                "remove the symlink at that name; engine_kit never follows it.",
            )
        )
    return os.path.join(os.fspath(directory), name)


def _encode_metric(metric: float | None) -> float | str | None:
    if metric is None or math.isfinite(metric):
        return metric
    return "nan" if math.isnan(metric) else ("inf" if metric > 0 else "-inf")


def _decode_metric(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"metric {value!r} is not a number, null, 'nan', 'inf' or '-inf'")


def _require_int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} {value!r} is not an integer >= 0")
    return value


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    """One committed checkpoint.

    Attributes:
        name: the file name inside the directory.
        sha256: hex SHA-256 of the whole file.
        size: the file size in bytes.
        step: the training step (iteration) it captured.
        epoch: the epoch it captured.
        tags: labels such as ``"last"`` or ``"best"``.
        metric: the score it was ranked by (may be NaN/inf), or ``None``.
        created: ``time.time()`` at commit.

    >>> e = RegistryEntry("a.ekpt", "0" * 64, 10, 5, 1, ("best",), float("nan"), 0.0)
    >>> RegistryEntry.from_json(e.to_json()).metric
    nan
    """

    name: str
    sha256: str
    size: int
    step: int
    epoch: int
    tags: tuple[str, ...] = ()
    metric: float | None = None
    created: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite metrics as strings)."""
        return {
            "name": self.name,
            "sha256": self.sha256,
            "size": self.size,
            "step": self.step,
            "epoch": self.epoch,
            "tags": list(self.tags),
            "metric": _encode_metric(self.metric),
            "created": self.created,
        }

    @classmethod
    def from_json(cls, obj: object) -> RegistryEntry:
        """Parse and validate one entry; ValueError with the reason otherwise."""
        if not isinstance(obj, dict):
            raise ValueError(f"entry {obj!r} is not an object")
        name = obj.get("name")
        validate_name(name)
        sha = obj.get("sha256")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise ValueError(f"sha256 {sha!r} is not 64 lowercase hex digits")
        tags = obj.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            raise ValueError(f"tags {tags!r} is not a list of strings")
        created = obj.get("created", 0.0)
        if not isinstance(created, (int, float)) or isinstance(created, bool) or not math.isfinite(created):
            raise ValueError(f"created {created!r} is not a finite number")
        return cls(
            name=name,  # type: ignore[arg-type]  # validated above
            sha256=sha,
            size=_require_int(obj, "size"),
            step=_require_int(obj, "step"),
            epoch=_require_int(obj, "epoch"),
            tags=tuple(tags),
            metric=_decode_metric(obj.get("metric")),
            created=float(created),
        )


class RegistryContents(NamedTuple):
    """What :func:`read_registry` found.

    Attributes:
        entries: the valid entries, sorted by step.
        dropped: why each invalid entry was dropped.
        pending: names rotation unregistered but may not have deleted yet.
    """

    entries: list[RegistryEntry]
    dropped: list[str]
    pending: list[str]


def read_registry(directory: str | os.PathLike[str]) -> RegistryContents:
    """Read ``registry.json``; invalid entries are dropped with a warning each.

    Args:
        directory: the checkpoint directory.

    Returns:
        The valid entries sorted by step (empty when there is no registry
        yet) and a description of each dropped entry.

    Raises:
        CheckpointCorruptError: the file is not JSON, or not a registry of a
            format version this code understands.
    """
    path = os.path.join(os.fspath(directory), REGISTRY_NAME)
    try:
        with open(path, "rb") as fileobj:
            document = json.loads(fileobj.read().decode("utf-8"))
    except FileNotFoundError:
        return RegistryContents([], [], [])
    except (OSError, ValueError) as exc:
        raise CheckpointCorruptError(
            fix_message(
                f"Registry {path!r} cannot be read: {exc}.",
                "restore it from a backup, or delete it (checkpoint files verify on their own) and re-register.",
            )
        ) from exc
    version = document.get("format_version") if isinstance(document, dict) else None
    if version != REGISTRY_FORMAT_VERSION or not isinstance(document.get("entries"), list):
        raise CheckpointCorruptError(
            fix_message(
                f"Registry {path!r} has format_version={version!r}; this engine_kit reads version {REGISTRY_FORMAT_VERSION}.",
                "use the engine_kit version that wrote it.",
            )
        )
    entries: list[RegistryEntry] = []
    dropped: list[str] = []
    for raw in document["entries"]:
        try:
            entry = RegistryEntry.from_json(raw)
            resolve_inside(directory, entry.name)
            if any(seen.name == entry.name for seen in entries):
                raise ValueError(f"{entry.name!r} is listed twice")
        except (ValueError, TypeError) as exc:
            reason = str(exc).split(" To fix:")[0]
            dropped.append(reason)
            warnings.warn(f"engine_kit: ignoring registry entry in {path!r}: {reason}", stacklevel=2)
            continue
        entries.append(entry)
    entries.sort(key=lambda entry: (entry.step, entry.created))
    pending: list[str] = []
    raw_pending = document.get("pending_delete", [])
    for name in raw_pending if isinstance(raw_pending, list) else [raw_pending]:
        try:
            pending.append(validate_name(name))
        except (ValueError, TypeError) as exc:
            warnings.warn(f"engine_kit: ignoring pending deletion in {path!r}: {str(exc).split(' To fix:')[0]}", stacklevel=2)
    return RegistryContents(entries, dropped, [name for name in pending if all(e.name != name for e in entries)])


def _current_pending(directory: str | os.PathLike[str]) -> list[str]:
    """The pending deletions on disk whose files still exist."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported by whoever reads entries
            pending = read_registry(directory).pending
    except CheckpointCorruptError:
        return []
    return [name for name in pending if os.path.lexists(os.path.join(os.fspath(directory), name))]


def write_registry(
    directory: str | os.PathLike[str], entries: list[RegistryEntry], pending: list[str] | tuple[str, ...] | None = None
) -> None:
    """Atomically replace ``registry.json`` with ``entries`` (sorted by step).

    Args:
        directory: the checkpoint directory.
        entries: the committed checkpoints.
        pending: unregistered names whose files are about to be deleted,
            recorded so that a crash before the unlink cannot leak them;
            ``None`` keeps the current list (minus files already gone).

    Raises:
        CheckpointWriteError: the write failed; the old registry is intact.
    """
    if pending is None:
        pending = _current_pending(directory)
    ordered = sorted(entries, key=lambda entry: (entry.step, entry.created))
    registered = {entry.name for entry in ordered}
    document = {
        "format_version": REGISTRY_FORMAT_VERSION,
        "entries": [entry.to_json() for entry in ordered],
        "pending_delete": sorted({validate_name(name) for name in pending} - registered),
    }
    # allow_nan=False: a bare NaN would make the file unreadable to strict JSON parsers.
    data = json.dumps(document, indent=1, allow_nan=False).encode("utf-8")
    atomic_write(os.path.join(os.fspath(directory), REGISTRY_NAME), lambda fileobj: fileobj.write(data))
