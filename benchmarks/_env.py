"""What every benchmark result records: date, device, versions and the commit measured.

Shared by the scripts in this folder (each runs as ``python benchmarks/<script>.py``,
which puts this folder on ``sys.path``).

>>> sorted(environment(torch.device("cpu")))
['commit', 'date_utc', 'device', 'ignite', 'python', 'torch', 'torch_threads']
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import ignite
import torch


def cpu_name() -> str:
    """The CPU model as ``lscpu`` shows it, and the core count."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores"


def git_commit() -> str:
    """The repository's HEAD commit (read-only), so results name the code they measured."""
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    """Date (UTC), device name, torch threads, versions and commit, for RESULTS.md."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": name,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ignite": ignite.__version__,
        "commit": git_commit(),
    }


def describe(env: dict[str, Any]) -> str:
    """One line with everything :func:`environment` recorded."""
    return (f"{env['date_utc']}; {env['device']}; torch threads {env['torch_threads']}; python {env['python']}, "
            f"torch {env['torch']}, ignite {env['ignite']}; commit {env['commit']}")
