"""The ``engine-kit ckpt`` subcommands: verify, inspect and repair, as plain functions.

Each prints human-readable lines and returns the exit status: 0 when
everything checked is valid, 1 otherwise (with a one-line reason per
problem). None of them ever prints a traceback for a bad input: a FIFO, a
directory, a damaged or odd file all give a readable line. Reading never
unpickles unsafely (trailer check, pickle allow-list scan,
``torch.load(weights_only=True)``) and never blocks on a FIFO; ``verify``
streams, so its memory does not grow with the file's size.

>>> verify_command("/nonexistent.ekpt")  # doctest: +ELLIPSIS
INVALID /nonexistent.ekpt: Checkpoint '/nonexistent.ekpt' is unusable: it cannot be read (...
1
"""

from __future__ import annotations

import datetime
import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from engine_kit.checkpoint.directory import CheckpointDirectory, RepairReport
from engine_kit.checkpoint.fileformat import load_checkpoint_file, verify_checkpoint_file
from engine_kit.checkpoint.registry import RegistryEntry
from engine_kit.errors import CheckpointError

_SHOWN_CHARS = 60


def human_size(n: int) -> str:
    """Bytes as B/KiB/MiB/GiB.

    >>> human_size(512), human_size(3 * 1024 ** 3)
    ('512 B', '3.0 GiB')
    """
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _shown(value: Any) -> str:
    """A value as one short line, whatever its type."""
    text = repr(value) if not isinstance(value, str) else value
    text = text.replace("\n", " ")
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


@contextmanager
def _notes() -> Iterator[None]:
    """Print the warnings raised inside as ``note:`` lines (no file:line noise)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                print(f"note: {str(warning.message).removeprefix('engine_kit: ')}")


def _guarded(path: str, action: Callable[[], int]) -> int:
    """Run a command body; any failure becomes one INVALID line and status 1."""
    try:
        return action()
    except (CheckpointError, OSError, ValueError, TypeError) as err:
        print(f"INVALID {path}: {_first_line(err)}")
        return 1


def _entry_line(entry: RegistryEntry) -> str:
    return (
        f"  {entry.name}  step {entry.step}  epoch {entry.epoch}  metric {entry.metric}  "
        f"tags {list(entry.tags)}  order {entry.order}  run {entry.run_id}  {human_size(entry.size)}"
    )


def _check_directory(path: str) -> int:
    """Verify every indexed checkpoint of a directory; list the set-aside files."""
    with _notes():
        directory = CheckpointDirectory(path, read_only=True)
        entries = directory.entries()
        aside = directory.excluded_files()
    valid = 0
    lines = []
    for entry in entries:
        try:
            verify_checkpoint_file(os.path.join(directory.path, entry.name))
            verdict = "valid"
            valid += 1
        except CheckpointError as err:
            verdict = f"INVALID: {_first_line(err)}"
        lines.append(f"{_entry_line(entry)}  {verdict}")
    print(f"checkpoint directory {directory.path}: {len(entries)} registered, {valid} valid, {len(aside)} set aside")
    print("\n".join(lines + [f"  {name}  set aside: {reason}" for name, reason in sorted(aside.items())]))
    return 0 if valid == len(entries) else 1


def verify_command(path: str) -> int:
    """``engine-kit ckpt verify PATH``: a file, or every checkpoint of a directory."""

    def run() -> int:
        if os.path.isfile(os.path.join(path, "MANIFEST.json")):
            from engine_kit.distributed.sharded import verify_sharded  # a sharded (FSDP2) checkpoint

            files = verify_sharded(path)["files"]
            print(f"OK {path} (sharded: {len(files)} files, {human_size(sum(f['size'] for f in files.values()))}, every SHA-256 verified)")
            return 0
        if os.path.isdir(path):
            return _check_directory(path)
        info = verify_checkpoint_file(path)
        where = f", step {info.record.step}, order {info.record.order}" if info.record else ", format 1"
        print(f"OK {path} ({human_size(info.size_bytes)}, sha256 {info.sha256[:16]}...{where})")
        return 0

    return _guarded(path, run)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _when(created: Any) -> str:
    if isinstance(created, (int, float)) and not isinstance(created, bool) and math.isfinite(created):
        try:
            return datetime.datetime.fromtimestamp(created).isoformat(timespec="seconds")
        except (OverflowError, OSError, ValueError):
            pass
    return "?" if created is None else _shown(created)


def describe_payload(path: str, payload: dict[str, Any], size: int) -> list[str]:
    """Summary lines of a loaded payload; tolerant of missing fields and odd types.

    >>> describe_payload("a.ekpt", {"meta": "odd", "model": [1]}, 10)[2]
    '  optimizer step  None  (iteration None, epoch None)'
    """
    import torch

    meta = _mapping(payload.get("meta"))
    model = _mapping(payload.get("model"))
    n_params = sum(t.numel() for t in model.values() if isinstance(t, torch.Tensor))
    optimizer = _mapping(meta.get("optimizer")).get("class")
    sections = sorted(str(key) for key in payload if key != "meta")
    return [
        f"checkpoint {path}",
        f"  size            {human_size(size)}",
        f"  optimizer step  {_shown(meta.get('optimizer_steps'))}  (iteration {_shown(meta.get('iteration'))}, epoch {_shown(meta.get('epoch'))})",
        f"  metric          {_shown(meta.get('metric'))}",
        f"  precision       {_shown(meta.get('precision'))}",
        f"  optimizer       {_shown(optimizer)}",
        f"  model           {len(model)} tensors, {n_params:,} values",
        f"  handlers        {sorted(str(key) for key in _mapping(payload.get('stateful')))}",
        f"  sections        {sections}",
        f"  written         {_when(meta.get('created'))} by engine_kit {_shown(meta.get('engine_kit_version'))}, "
        f"torch {_shown(meta.get('torch_version'))}, format {_shown(meta.get('format_version'))}",
    ]


def inspect_command(path: str) -> int:
    """``engine-kit ckpt inspect PATH``: a file's summary, or a directory's entries each verified."""

    def run() -> int:
        if os.path.isdir(path):
            return _check_directory(path)
        info = verify_checkpoint_file(path)
        payload = load_checkpoint_file(path, expected_sha256=info.sha256)
        lines = describe_payload(path, payload, info.size_bytes)
        if info.record is not None:
            record = info.record
            lines.insert(2, f"  record          {record.name}: step {record.step}, epoch {record.epoch}, order {record.order}, "
                            f"run {record.run_id}, tags {list(record.tags)}")
        print("\n".join(lines))
        return 0

    return _guarded(path, run)


def _report_lines(report: RepairReport) -> list[str]:
    return [
        *([f"rebuilt registry.json: it {report.rebuilt_because}"] if report.rebuilt_because else []),
        *([f"dropped entries for missing files: {report.missing}"] if report.missing else []),
        *(f"dropped entry: {reason}" for reason in report.invalid),
        *([f"adopted verified files: {report.adopted}"] if report.adopted else []),
        *(f"set aside (kept in place, not indexed) {name}: {reason}" for name, reason in sorted(report.set_aside.items())),
        *([f"finished interrupted deletions: {report.finished}"] if report.finished else []),
    ]


def repair_command(path: str) -> int:
    """``engine-kit ckpt repair DIR``: rebuild the index from the files that verify, and say what changed."""

    def run() -> int:
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{path!r} is not a directory")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the report below says it all, once
            with CheckpointDirectory(path, create=False) as directory:
                reports = [directory.repaired_at_open, directory.repair(full=True)]
                count = len(directory.entries())
        changes = [line for report in reports if report is not None for line in _report_lines(report)]
        print(f"repaired {os.path.abspath(path)}: {count} checkpoint(s) indexed, no checkpoint file deleted")
        print("\n".join(f"  {line}" for line in changes) if changes else "  nothing to repair: the index matches the files")
        return 0

    return _guarded(path, run)
