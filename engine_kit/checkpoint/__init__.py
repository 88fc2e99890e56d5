"""Checkpoint storage: self-describing atomic files, a rebuildable index, one writer.

Plain files only; this package knows nothing about engines. Each ``.ekpt``
file carries a SHA-256 trailer and its own record (step, epoch, metric,
tags, creation order, run); ``registry.json`` is an index over the files
that is rebuilt from them whenever it is missing, damaged or inconsistent.

>>> from engine_kit.checkpoint import CheckpointDirectory, load_checkpoint_file
"""

from engine_kit.checkpoint.async_commit import PendingCommit
from engine_kit.checkpoint.atomic import TEMP_PREFIX, atomic_write, fsync_directory, sweep_stale_temps
from engine_kit.checkpoint.directory import CheckpointDirectory, RepairReport
from engine_kit.checkpoint.fileformat import (
    CheckpointFileInfo,
    load_checkpoint_file,
    read_record,
    save_checkpoint_file,
    seal_archive_file,
    sha256_file,
    verify_checkpoint_file,
)
from engine_kit.checkpoint.lock import LOCK_NAME, DirectoryLock
from engine_kit.checkpoint.record import CheckpointRecord
from engine_kit.checkpoint.regular import open_regular
from engine_kit.checkpoint.registry import (
    CHECKPOINT_SUFFIX,
    REGISTRY_NAME,
    RegistryEntry,
    read_registry,
    validate_name,
    write_registry,
)

__all__ = [
    "CHECKPOINT_SUFFIX",
    "LOCK_NAME",
    "REGISTRY_NAME",
    "TEMP_PREFIX",
    "CheckpointDirectory",
    "CheckpointFileInfo",
    "CheckpointRecord",
    "DirectoryLock",
    "PendingCommit",
    "RegistryEntry",
    "RepairReport",
    "atomic_write",
    "fsync_directory",
    "load_checkpoint_file",
    "open_regular",
    "read_record",
    "read_registry",
    "save_checkpoint_file",
    "seal_archive_file",
    "sha256_file",
    "sweep_stale_temps",
    "validate_name",
    "verify_checkpoint_file",
    "write_registry",
]
