"""`engine-kit ckpt verify` streams: its peak memory does not grow with the file, nor with what a crafted file declares.

Peak RSS is measured on the real command in a child process, through a
wrapper that reports ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (so the test
process's own memory never counts), against a baseline child that imports
the same modules and verifies nothing. Large files are written sparse: zero
runs become holes, so a 3 GiB checkpoint costs no disk and little time.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import IO

import pytest

from engine_kit.checkpoint import CheckpointRecord, seal_archive_file, verify_checkpoint_file
from engine_kit.errors import CheckpointCorruptError
from tests.checkpoint.conftest import child_env

EXTRA_MEMORY_LIMIT_KIB = 200 * 1024
_MIB = 1 << 20

_WRAPPER = (
    "import resource, subprocess, sys; "
    "status = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "print(status, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)
_BASELINE = "import engine_kit.cli, engine_kit.checkpoint.commands"


def peak_rss_kib(*command: str) -> tuple[int, int]:
    """(exit status, peak RSS in KiB) of ``command`` run as a grandchild."""
    wrapper = subprocess.run(
        ["timeout", "300", sys.executable, "-c", _WRAPPER, *command], env=child_env(), capture_output=True, text=True, check=True
    )
    status, peak = wrapper.stdout.split()
    return int(status), int(peak)


def verify_peak(path: Path) -> tuple[int, int]:
    return peak_rss_kib(sys.executable, "-m", "engine_kit.cli", "ckpt", "verify", str(path))


class SparseWriter:
    """A file object for ``zipfile`` that turns all-zero writes into holes."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self._file = fileobj

    def write(self, data: bytes) -> int:
        if data.count(0) == len(data):
            self._file.seek(len(data), os.SEEK_CUR)
        else:
            self._file.write(data)
        return len(data)

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def flush(self) -> None:
        self._file.flush()

    def seekable(self) -> bool:
        return True


def write_sparse_checkpoint(path: Path, data_bytes: int) -> None:
    """A valid, sealed checkpoint whose one tensor storage is ``data_bytes`` of zeros (written as a hole)."""
    with open(path, "wb") as raw:
        with zipfile.ZipFile(SparseWriter(raw), "w") as archive:  # type: ignore[arg-type]
            archive.writestr("archive/data.pkl", pickle.dumps({"meta": {"step": 1}}, protocol=2))
            with archive.open("archive/data/0", "w", force_zip64=True) as member:
                zeros = bytes(8 * _MIB)
                for start in range(0, data_bytes, len(zeros)):
                    member.write(zeros[: data_bytes - start])
        raw.truncate(raw.tell())
    seal_archive_file(path, CheckpointRecord(path.name, step=1, epoch=0, order=1))


def write_zip_bomb(path: Path) -> None:
    """About 1 MB on disk: a deflated data.pkl declaring 256 MiB, plus incompressible padding."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("archive/data.pkl", "w", force_zip64=True) as member:
            zeros = bytes(16 * _MIB)
            for _ in range(16):
                member.write(zeros)
        archive.writestr("archive/padding", os.urandom(3 * _MIB // 4), compress_type=zipfile.ZIP_STORED)
    seal_archive_file(path, CheckpointRecord(path.name, step=1, epoch=0, order=1))


def write_huge_directory_claim(path: Path) -> None:
    """A small valid zip whose end record claims a 3 GiB central directory with 10 million entries."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HHL", data, at + 8, 0xFFFE, 0xFFFE, 3 << 30)
    path.write_bytes(bytes(data))
    seal_archive_file(path, CheckpointRecord(path.name, step=1, epoch=0, order=1))


def test_crafted_files_are_refused_before_anything_big_is_read(tmp_path: Path) -> None:
    bomb, claim = tmp_path / "bomb.ekpt", tmp_path / "claim.ekpt"
    write_zip_bomb(bomb)
    write_huge_directory_claim(claim)
    assert bomb.stat().st_size < 2 * _MIB
    with pytest.raises(CheckpointCorruptError, match="is compressed"):
        verify_checkpoint_file(bomb)
    with pytest.raises(CheckpointCorruptError, match="directory declares 3221225472 bytes"):
        verify_checkpoint_file(claim)


def test_verify_memory_is_flat_for_crafted_and_large_files(tmp_path: Path) -> None:
    """One child verifies a directory of crafted and small files, another a 300 MB file."""
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    write_zip_bomb(crafted / "bomb.ekpt")
    write_huge_directory_claim(crafted / "claim.ekpt")
    write_sparse_checkpoint(crafted / "small.ekpt", 8 * _MIB)
    large = tmp_path / "large.ekpt"
    write_sparse_checkpoint(large, 300 * _MIB)
    assert large.stat().st_size > 300 * _MIB

    _, baseline = peak_rss_kib(sys.executable, "-c", _BASELINE)
    crafted_status, crafted_peak = verify_peak(crafted)  # every file judged in full, the bad ones set aside
    large_status, large_peak = verify_peak(large)
    assert crafted_status == large_status == 0
    assert crafted_peak - baseline < EXTRA_MEMORY_LIMIT_KIB, (crafted_peak, baseline)
    assert large_peak - baseline < EXTRA_MEMORY_LIMIT_KIB, (large_peak, baseline)
    # Memory does not grow with the file: 8 MiB and 300 MB files peak alike.
    assert large_peak - crafted_peak < 32 * 1024, (large_peak, crafted_peak)


@pytest.mark.slow
def test_verify_of_a_3_gib_checkpoint_stays_under_200_mb(tmp_path: Path) -> None:
    large = tmp_path / "large.ekpt"
    write_sparse_checkpoint(large, 3 << 30)
    _, baseline = peak_rss_kib(sys.executable, "-c", _BASELINE)
    status, peak = verify_peak(large)
    assert status == 0 and peak - baseline < EXTRA_MEMORY_LIMIT_KIB, (peak, baseline)
