"""Checkpoint storage: atomic files, integrity trailers, a registry, one writer.

Plain files only; this package knows nothing about engines. See
RELIABILITY.md for the write and read paths it implements.

>>> from engine_kit.checkpoint import CheckpointDirectory, load_checkpoint_file
"""

from engine_kit.checkpoint.atomic import TEMP_PREFIX, atomic_write, fsync_directory, sweep_stale_temps
from engine_kit.checkpoint.directory import CheckpointDirectory, RepairReport
from engine_kit.checkpoint.fileformat import (
    CheckpointFileInfo,
    load_checkpoint_file,
    save_checkpoint_file,
    sha256_file,
    verify_checkpoint_file,
)
from engine_kit.checkpoint.lock import LOCK_NAME, DirectoryLock
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
    "DirectoryLock",
    "RegistryEntry",
    "RepairReport",
    "atomic_write",
    "fsync_directory",
    "load_checkpoint_file",
    "read_registry",
    "save_checkpoint_file",
    "sha256_file",
    "sweep_stale_temps",
    "validate_name",
    "verify_checkpoint_file",
    "write_registry",
]
