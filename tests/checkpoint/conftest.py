"""Shared helpers for the checkpoint storage tests: payloads, corruption, children."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_payload(step: int, numel: int = 1 << 16) -> dict:
    """A small checkpoint-like payload whose tensors all encode ``step``."""
    return {
        "step": step,
        "weights": torch.full((numel,), float(step)),
        "index": torch.arange(numel) + step,
        "meta": {"step": step, "note": "test"},
    }


def payload_matches(payload: dict, step: int) -> bool:
    """Whether a loaded payload is exactly the one :func:`make_payload` built."""
    expected = make_payload(step, numel=payload["weights"].numel())
    return (
        payload["step"] == step
        and torch.equal(payload["weights"], expected["weights"])
        and torch.equal(payload["index"], expected["index"])
    )


def flip_byte(path: Path, position: int) -> None:
    """Invert one byte of a file in place."""
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that imports engine_kit from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run_python(code: str, *, timeout: float = 60, **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``python -c code`` with engine_kit importable; capture text output."""
    return subprocess.run(
        [sys.executable, "-c", code], env=child_env(**extra_env), capture_output=True, text=True, timeout=timeout
    )


def listing(directory: Path) -> dict[str, bytes]:
    """Every file name in ``directory`` with its bytes (to compare states)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and not p.is_symlink()}
