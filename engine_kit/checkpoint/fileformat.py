"""One checkpoint file: ``torch.save`` bytes sealed with a SHA-256 trailer.

Layout of a ``.ekpt`` file::

    [ torch.save zip archive, N bytes ]
    [ b"EKCKPT1\\0" ][ SHA-256 of the N zip bytes, 32 bytes ][ N as big-endian u64, 8 bytes ]

The 48-byte trailer makes a file verify on its own, copied away from its
registry: an empty or truncated file has no trailer (or one whose length
disagrees), and any altered byte breaks the digest. ``torch.load`` never
checks the zip's CRC-32s, so without the trailer a flipped byte inside tensor
data would load silently. The digest is for integrity only (anyone can
recompute it); safety against code in the pickle comes from
:mod:`engine_kit.checkpoint.safety` plus ``weights_only=True``.

Reading verifies the trailer first, then scans the pickle's globals, then
calls ``torch.load(..., weights_only=True)``; every failure is a
:class:`~engine_kit.errors.CheckpointCorruptError` with a one-line reason.

>>> import tempfile, pathlib, torch
>>> path = pathlib.Path(tempfile.mkdtemp()) / "a.ekpt"
>>> info = save_checkpoint_file(path, {"w": torch.ones(2), "meta": {"step": 3}})
>>> load_checkpoint_file(path)["w"]
tensor([1., 1.])
>>> verify_checkpoint_file(path).meta
{'step': 3}
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import torch

from engine_kit.checkpoint.atomic import atomic_write
from engine_kit.checkpoint.safety import scan_pickle, weights_only_env_conflict
from engine_kit.errors import CheckpointCorruptError, CheckpointError, CheckpointWriteError, fix_message

MAGIC = b"EKCKPT1\0"
TRAILER_SIZE = len(MAGIC) + 32 + 8
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class CheckpointFileInfo:
    """What :func:`verify_checkpoint_file` learned about a sound file.

    Attributes:
        path: the file.
        size_bytes: its size, trailer included.
        sha256: hex SHA-256 of the whole file (what the registry records).
        meta: the payload's ``"meta"`` dict, or ``None`` when absent.
    """

    path: str
    size_bytes: int
    sha256: str
    meta: dict[str, Any] | None


def make_trailer(zip_bytes: bytes | memoryview, digest: Any = None) -> bytes:
    """The 48-byte trailer that seals ``zip_bytes`` (``digest``: its sha256 object, if already computed).

    >>> len(make_trailer(b"abc")) == TRAILER_SIZE
    True
    """
    digest = digest if digest is not None else hashlib.sha256(zip_bytes)
    return MAGIC + digest.digest() + struct.pack(">Q", len(zip_bytes))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a whole file, read in 1 MiB chunks.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile(delete=False) as f:
    ...     _ = f.write(b"abc")
    >>> sha256_file(f.name)[:12]
    'ba7816bf8f01'
    """
    digest = hashlib.sha256()
    with open(os.fspath(path), "rb") as fileobj:
        while chunk := fileobj.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _corrupt(path: str, reason: str, fix: str = "fall back to an older checkpoint.") -> CheckpointCorruptError:
    return CheckpointCorruptError(fix_message(f"Checkpoint {path!r} is unusable: {reason}.", fix))


def save_checkpoint_file(path: str | os.PathLike[str], payload: dict[str, Any]) -> CheckpointFileInfo:
    """Serialize ``payload`` and write it atomically with its trailer.

    The pickle is checked against the load-time allow-list *before* anything
    touches the disk, so a payload that could never be loaded safely (a
    numpy array, a custom class) fails now, not at resume time.

    Args:
        path: the final file name (its directory must exist).
        payload: a dict of tensors, numbers, strings and containers of them.

    Returns:
        The written file's info (``sha256`` is what a registry records).

    Raises:
        TypeError: ``payload`` is not a dict.
        CheckpointWriteError: serializing or writing failed; nothing under
            ``path`` changed and no temp file is left.
    """
    path = os.fspath(path)
    if not isinstance(payload, dict):
        raise TypeError(fix_message(f"payload must be a dict, got {type(payload).__name__}.", "wrap it: {'state': obj}."))
    buffer = io.BytesIO()
    try:
        torch.save(payload, buffer)
        _scan_archive(buffer)
        zip_bytes = buffer.getbuffer()  # a view: no copy of a multi-GB checkpoint
    except Exception as exc:
        raise CheckpointWriteError(
            fix_message(
                f"Cannot serialize the checkpoint for {path!r}: {exc}. Nothing was written.",
                "store only tensors, numbers, strings, None and dicts/lists/tuples of them "
                "(convert numpy arrays with torch.from_numpy).",
            )
        ) from exc
    # One pass of SHA-256 over the data serves both the trailer and the whole-file digest.
    data_digest = hashlib.sha256(zip_bytes)
    trailer = make_trailer(zip_bytes, data_digest)
    whole = data_digest.copy()
    whole.update(trailer)

    def write(fileobj: io.BufferedWriter) -> None:
        fileobj.write(zip_bytes)
        fileobj.write(trailer)

    atomic_write(path, write)
    meta = payload.get("meta")
    return CheckpointFileInfo(path, len(zip_bytes) + TRAILER_SIZE, whole.hexdigest(), meta if isinstance(meta, dict) else None)


def _read_sealed(path: str) -> tuple[bytes, str, int]:
    """Read and check the trailer; return (zip bytes, file sha256 hex, file size)."""
    try:
        with open(path, "rb") as fileobj:
            size = fileobj.seek(0, io.SEEK_END)
            if size < TRAILER_SIZE:
                raise _corrupt(path, f"it is {size} bytes, shorter than the {TRAILER_SIZE}-byte trailer (empty or truncated)")
            fileobj.seek(size - TRAILER_SIZE)
            trailer = fileobj.read(TRAILER_SIZE)
            if not trailer.startswith(MAGIC):
                raise _corrupt(path, "no engine_kit trailer at its end (truncated, appended to, or not written by engine_kit)")
            (length,) = struct.unpack(">Q", trailer[-8:])
            if length != size - TRAILER_SIZE:
                raise _corrupt(path, f"its trailer records {length} bytes of data but {size - TRAILER_SIZE} precede it (truncated or spliced)")
            fileobj.seek(0)
            zip_bytes = fileobj.read(length)
    except OSError as exc:
        raise _corrupt(path, f"it cannot be read ({exc!r})", "check that the file exists and the disk is healthy.") from exc
    digest = hashlib.sha256(zip_bytes)
    if len(zip_bytes) != length or digest.digest() != trailer[len(MAGIC) : len(MAGIC) + 32]:
        raise _corrupt(path, "its SHA-256 does not match the trailer (a byte was altered on disk or in transit)")
    digest.update(trailer)
    return zip_bytes, digest.hexdigest(), size


def _scan_archive(zip_bytes: bytes | io.BytesIO) -> None:
    """Scan every pickle in a torch.save archive (bytes, or the buffer itself to avoid a copy)."""
    source = zip_bytes if isinstance(zip_bytes, io.BytesIO) else io.BytesIO(zip_bytes)
    try:
        with zipfile.ZipFile(source) as archive:
            members = archive.infolist()
            names = [member.filename for member in members]
            if len(set(names)) != len(names):
                # Zip readers disagree on which duplicate wins; torch could
                # unpickle one we did not scan.
                raise ValueError("the archive holds duplicate member names")
            pickles = [member for member in members if member.filename.endswith(".pkl")]
            if not any(member.filename.endswith("/data.pkl") for member in pickles):
                raise ValueError("the archive has no data.pkl (not a torch.save file)")
            for member in pickles:
                scan_pickle(archive.read(member))
    except zipfile.BadZipFile as exc:
        raise ValueError(f"not a valid zip archive ({exc})") from exc


def _safe_load(path: str, zip_bytes: bytes, map_location: Any) -> dict[str, Any]:
    try:
        _scan_archive(zip_bytes)
    except ValueError as exc:
        raise _corrupt(path, f"refused: the file carries code or unknown types ({exc})", "load only checkpoints you trust were written by engine_kit.") from exc
    conflict = weights_only_env_conflict()
    if conflict is not None:
        raise CheckpointError(fix_message(f"Cannot load {path!r} safely: {conflict}.", "unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD."))
    try:
        # weights_only=True, explicitly, every time: torch lets the env var
        # override only an *unset* weights_only.
        payload = torch.load(io.BytesIO(zip_bytes), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _corrupt(path, f"refused: the file carries code that weights_only loading rejects ({reason})") from exc
    except Exception as exc:
        raise _corrupt(path, f"torch.load failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(payload, dict):
        raise _corrupt(path, f"its payload is a {type(payload).__name__}, not a dict")
    return payload


def load_checkpoint_file(
    path: str | os.PathLike[str], map_location: Any = "cpu", *, expected_sha256: str | None = None
) -> dict[str, Any]:
    """Verify a checkpoint file, then load its payload without executing code.

    Args:
        path: the ``.ekpt`` file.
        map_location: passed to ``torch.load``.
        expected_sha256: hex digest of the whole file the caller recorded (the
            registry's); checked on the same bytes that are loaded.

    Returns:
        The payload dict.

    Raises:
        CheckpointCorruptError: missing, empty, truncated, altered, a digest
            other than ``expected_sha256``, or a pickle that carries code.
    """
    path = os.fspath(path)
    zip_bytes, file_sha, _size = _read_sealed(path)
    if expected_sha256 is not None and file_sha != expected_sha256:
        raise _corrupt(path, f"its SHA-256 {file_sha[:16]}... differs from the recorded {expected_sha256[:16]}... (replaced or altered)")
    return _safe_load(path, zip_bytes, map_location)


def verify_checkpoint_file(path: str | os.PathLike[str]) -> CheckpointFileInfo:
    """Check a file end to end (trailer, digest, pickle allow-list, safe load).

    Args:
        path: the ``.ekpt`` file.

    Returns:
        Its :class:`CheckpointFileInfo`.

    Raises:
        CheckpointCorruptError: with a one-line reason naming ``path``.
    """
    path = os.fspath(path)
    zip_bytes, file_sha, size = _read_sealed(path)
    payload = _safe_load(path, zip_bytes, "cpu")
    meta = payload.get("meta")
    return CheckpointFileInfo(path, size, file_sha, meta if isinstance(meta, dict) else None)
