"""The index of committed checkpoints: ``registry.json`` in the directory.

The files are the truth; this is an index over them that can always be
rebuilt from the files that verify (each carries its own record, see
:mod:`engine_kit.checkpoint.record`). The directory rebuilds it whenever it
is missing, damaged or disagrees with the files
(:mod:`engine_kit.checkpoint.index`); this module only reads and writes it.

It is rewritten whole with :func:`atomic_write`, so a crash leaves either
the old or the new index, and it carries a SHA-256 of its own content so a
hand edit or a flipped byte is detected rather than believed. Its JSON
(written compact, on one line; shown here spread out)::

    {"format_version": 2,
     "entries": [{"name": "step00000100-00003.ekpt", "sha256": "<64 hex>", "size": 1234,
                  "step": 100, "epoch": 2, "tags": ["last"], "metric": 0.25,
                  "created": 1700000000.0, "order": 3, "run_id": "exp1"}, ...],
     "pending_delete": ["step00000050-00002.ekpt"],
     "set_aside": {"copy.ekpt": {"reason": "...", "size": 10, "mtime_ns": 1}},
     "next_order": 4,
     "digest": "<64 hex: SHA-256 of the canonical JSON of everything else>"}

Format 1 (no digest, order, run_id or set_aside) is still read. JSON has no
NaN: a non-finite metric is stored as ``"nan"``, ``"inf"`` or ``"-inf"``.
Names are checked when written *and* when read: an entry whose name could
reach outside the directory (``../x``, ``/abs``, a symlinked path) is
dropped with a warning and never acted on.

``pending_delete`` lists names rotation has unregistered but maybe not yet
unlinked; the directory finishes those deletions after a crash.
``set_aside`` lists files present in the directory that the index excludes
(they did not verify, belong to another run, or are not regular files),
with their size and mtime so they are looked at again only when they change.

>>> validate_name("step-000001.ekpt")
'step-000001.ekpt'
>>> validate_name("../outside.ekpt")
Traceback (most recent call last):
...
ValueError: Checkpoint name '../outside.ekpt' is not a plain file name: it contains '/'. To fix: pass a bare name such as 'step-000100.ekpt'.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from typing import Any, NamedTuple

from engine_kit.checkpoint.atomic import atomic_write
from engine_kit.checkpoint.record import SHARED_FIELDS, CheckpointRecord, require_count, shared_from_json, shared_to_json
from engine_kit.checkpoint.regular import open_regular
from engine_kit.errors import CheckpointCorruptError, fix_message

REGISTRY_NAME = "registry.json"
REGISTRY_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
CHECKPOINT_SUFFIX = ".ekpt"
MAX_NAME_BYTES = 255
MAX_REGISTRY_BYTES = 64 << 20

_HEX64 = re.compile(r"[0-9a-f]{64}")
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


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    """One committed checkpoint, as the index lists it.

    Attributes:
        name: the file name inside the directory.
        sha256: hex SHA-256 of the whole file.
        size: the file size in bytes.
        step: the training step (iteration) it captured.
        epoch: the epoch it captured.
        tags: labels such as ``"last"`` or ``"best"`` (current, may be retagged).
        metric: the score it was ranked by (may be NaN/inf), or ``None``.
        created: ``time.time()`` at commit.
        order: its creation order in the directory (0 for files without a record).
        run_id: the identity of the run that wrote it, or ``None``.

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
    order: int = 0
    run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite metrics as strings)."""
        return {**shared_to_json(self), "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, obj: object) -> RegistryEntry:
        """Parse and validate one entry; ValueError with the reason otherwise."""
        if not isinstance(obj, dict):
            raise ValueError(f"entry {obj!r} is not an object")
        validate_name(obj.get("name"))
        sha = obj.get("sha256")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise ValueError(f"sha256 {sha!r} is not 64 lowercase hex digits")
        return cls(sha256=sha, size=require_count(obj, "size"), **shared_from_json(obj, order_default=0))

    @classmethod
    def from_record(cls, record: CheckpointRecord, sha256: str, size: int) -> RegistryEntry:
        """The index entry of a verified file: its record plus its digest and size."""
        return cls(sha256=sha256, size=size, **{field: getattr(record, field) for field in SHARED_FIELDS})


def sort_key(entry: RegistryEntry) -> tuple[int, int, float]:
    """Oldest first: by step, then creation order, then time."""
    return (entry.step, entry.order, entry.created)


class RegistryContents(NamedTuple):
    """What :func:`read_registry` found.

    Attributes:
        entries: the valid entries, sorted by step (then creation order).
        dropped: why each invalid entry was dropped.
        pending: names rotation unregistered but may not have deleted yet.
        set_aside: files the index excludes: name -> {"reason", "size", "mtime_ns"}.
        next_order: the smallest creation order not yet handed out.
        found: whether ``registry.json`` existed at all.
    """

    entries: list[RegistryEntry]
    dropped: list[str]
    pending: list[str]
    set_aside: dict[str, dict[str, Any]] = {}
    next_order: int = 1
    found: bool = False


def _canonical_json(body: dict[str, Any]) -> bytes:
    """The canonical JSON of ``body``: sorted keys, no spaces (json's C encoder writes it).

    ``allow_nan=False``: a bare NaN would make the file unreadable to strict JSON parsers.
    """
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _content_digest(document: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``document`` without its ``digest`` key."""
    return hashlib.sha256(_canonical_json({key: value for key, value in document.items() if key != "digest"})).hexdigest()


def _unreadable(path: str, reason: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        fix_message(f"Registry {path!r} cannot be used: {reason}.", "run `engine-kit ckpt repair DIR`: the index is rebuilt from the checkpoint files.")
    )


def _load_document(path: str) -> dict[str, Any] | None:
    """The registry's JSON object with its digest checked; None when absent."""
    try:
        with open_regular(path, "registry") as fileobj:
            raw = fileobj.read(MAX_REGISTRY_BYTES + 1)
    except FileNotFoundError:
        return None
    except CheckpointCorruptError:
        raise  # not a regular file: its own typed error
    except OSError as exc:
        raise _unreadable(path, f"it cannot be read ({exc!r})") from exc
    if len(raw) > MAX_REGISTRY_BYTES:
        raise _unreadable(path, f"it is larger than {MAX_REGISTRY_BYTES} bytes")
    try:
        document = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise _unreadable(path, f"it is not JSON ({exc})") from exc
    version = document.get("format_version") if isinstance(document, dict) else None
    if version not in _READABLE_VERSIONS or not isinstance(document.get("entries"), list):
        raise _unreadable(path, f"it has format_version={version!r}; this engine_kit reads versions {list(_READABLE_VERSIONS)}")
    if version >= 2 and document.get("digest") != _content_digest(document):
        raise _unreadable(path, "its content does not match its digest (edited by hand, or damaged)")
    return document


def read_registry(directory: str | os.PathLike[str]) -> RegistryContents:
    """Read ``registry.json``; invalid entries are dropped with a warning each.

    Args:
        directory: the checkpoint directory.

    Returns:
        The valid entries sorted by step (empty when there is no registry
        yet) and a description of each dropped entry.

    Raises:
        CheckpointCorruptError: the file is not JSON, fails its digest, or is
            not a registry of a format version this code understands;
            NotARegularFileError: it is a FIFO, directory or device.
    """
    path = os.path.join(os.fspath(directory), REGISTRY_NAME)
    document = _load_document(path)
    if document is None:
        return RegistryContents([], [], [], {}, 1, False)
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
    entries.sort(key=sort_key)
    pending = [name for name in _valid_names(path, document.get("pending_delete", []), "pending deletion") if all(e.name != name for e in entries)]
    raw_aside = document.get("set_aside", {})
    set_aside = {
        name: info
        for name, info in (raw_aside.items() if isinstance(raw_aside, dict) else [])
        if name in _valid_names(path, [name], "set-aside file") and isinstance(info, dict)
    }
    next_order = document.get("next_order", 1)
    if not isinstance(next_order, int) or isinstance(next_order, bool) or next_order < 1:
        next_order = 1
    return RegistryContents(entries, dropped, pending, set_aside, next_order, True)


def _valid_names(path: str, raw: object, what: str) -> list[str]:
    names = []
    for name in raw if isinstance(raw, list) else [raw]:
        try:
            names.append(validate_name(name))
        except (ValueError, TypeError) as exc:
            warnings.warn(f"engine_kit: ignoring {what} in {path!r}: {str(exc).split(' To fix:')[0]}", stacklevel=3)
    return names


def _current(directory: str | os.PathLike[str]) -> RegistryContents:
    """The registry on disk, or an empty one when it cannot be read (its reader reports that)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported by whoever reads entries
            return read_registry(directory)
    except CheckpointCorruptError:
        return RegistryContents([], [], [], {}, 1, False)


def write_registry(
    directory: str | os.PathLike[str],
    entries: list[RegistryEntry],
    pending: list[str] | tuple[str, ...] | None = None,
    *,
    set_aside: dict[str, dict[str, Any]] | None = None,
    next_order: int | None = None,
    durable: bool = True,
) -> None:
    """Atomically replace ``registry.json`` with ``entries`` (sorted by step), sealed by its digest.

    Args:
        directory: the checkpoint directory.
        entries: the committed checkpoints.
        pending: unregistered names whose files are about to be deleted,
            recorded so that a crash before the unlink cannot leak them;
            ``None`` keeps the current list (minus files already gone).
        set_aside: files the index excludes (``None`` keeps the current map).
        next_order: the next creation order to hand out; never lowered below
            the current value or any entry's order + 1 (when given, with
            ``pending`` and ``set_aside``, the current registry is not read).
        durable: fsync the file and the directory. False: the rename is
            still atomic, and the caller fsyncs the directory; a power loss
            may then leave an old or empty registry, which the directory
            detects and rebuilds from the files.

    Raises:
        CheckpointWriteError: the write failed; the old registry is intact.
    """
    given = pending is not None and set_aside is not None and next_order is not None
    current = RegistryContents([], [], [], {}, 1, False) if given else _current(directory)
    if pending is None:
        pending = [name for name in current.pending if os.path.lexists(os.path.join(os.fspath(directory), name))]
    if set_aside is None:
        set_aside = current.set_aside
    ordered = sorted(entries, key=sort_key)
    registered = {entry.name for entry in ordered}
    document: dict[str, Any] = {
        "format_version": REGISTRY_FORMAT_VERSION,
        "entries": [entry.to_json() for entry in ordered],
        "pending_delete": sorted({validate_name(name) for name in pending} - registered),
        "set_aside": {validate_name(name): info for name, info in sorted(set_aside.items()) if name not in registered},
        "next_order": max([next_order or 1, current.next_order, *(entry.order + 1 for entry in ordered)]),
    }
    # The file is the canonical JSON the digest covers, with the digest added as its last key:
    # one encoding serves both (a reader re-encodes what it parsed without the digest to check it).
    body = _canonical_json(document)
    data = b"%s,\"digest\":\"%s\"}" % (body[:-1], hashlib.sha256(body).hexdigest().encode("ascii"))
    atomic_write(
        os.path.join(os.fspath(directory), REGISTRY_NAME),
        lambda fileobj: fileobj.write(data),
        sync_file=durable,
        sync_directory=durable,
    )
