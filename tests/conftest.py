"""Test hygiene for the whole suite: no test may leak environment variables or
leave files in the repository (tests write under tmp_path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Set by libraries on first use, not by tests: tolerated.
_TOLERATED = {
    "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK", "PYTEST_CURRENT_TEST", "CUDA_MODULE_LOADING",
    "TORCHINDUCTOR_CACHE_DIR",  # torch sets it when ignite.distributed spawns workers
    "CRC32C_SW_MODE",  # the crc32c package (tensorboardX) sets it when first imported
}


def _repo_files() -> set[str]:
    return {name for name in os.listdir(REPO_ROOT) if name not in {".pytest_cache", "__pycache__"}}


@pytest.fixture(autouse=True)
def no_leaks():
    env_before = dict(os.environ)
    files_before = _repo_files()
    yield
    leaked = {k for k in set(os.environ) ^ set(env_before) if k not in _TOLERATED}
    changed = {k for k in set(os.environ) & set(env_before) if os.environ[k] != env_before[k] and k not in _TOLERATED}
    new_files = _repo_files() - files_before
    for key in leaked | changed:  # restore before failing, so one leak does not cascade
        if key in env_before:
            os.environ[key] = env_before[key]
        else:
            os.environ.pop(key, None)
    assert not (leaked or changed), f"the test leaked environment variables: {sorted(leaked | changed)}"
    assert not new_files, f"the test left files in the repository: {sorted(new_files)}"
