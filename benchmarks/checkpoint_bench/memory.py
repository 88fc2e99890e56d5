"""Extra peak host memory per save: one fresh subprocess per row, peak RSS with saves over peak RSS without.

Tensors are allocated by torch's C++ allocator, which ``tracemalloc`` never
sees, so this reads the kernel's accounting instead. Each row runs in a
fresh Python process (no buffers, caches or heap left over from another
row) that builds the same model, then runs the same short training loop
twice: without saves, then with a save every few steps (the last write
drained inside the loop). Before each loop the peak resident set size is
reset (``/proc/self/clear_refs``, then ``VmHWM`` from ``/proc/self/status``);
where the kernel refuses the reset, a thread samples ``VmRSS`` every
millisecond instead (the method used is recorded). Extra peak = peak with
saves − peak without: it includes everything a save keeps between saves
(reused snapshot buffers) and anything two overlapping saves hold at once:
saves every 4 steps are due while the previous write may still run, the
worst case for memory (a saver without back-pressure holds two snapshots).
Memory the C allocator keeps after a free and hands out again (the freed
gradients, say) is not counted twice: this is what the process really holds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .timing import progress, run_loop
from .workload import make_data, make_model

STEPS = 11  # one loop in the child: saves at steps 4 and 8, then drained at the end
EVERY = 4
SCRIPT = Path(__file__).resolve().parents[1] / "checkpoint_save.py"


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line; this measurement needs Linux")
    return int(match.group(1))


class PeakRss:
    """The peak resident set size of this process since :meth:`reset`, in bytes."""

    def __init__(self) -> None:
        self.method = "VmHWM after a clear_refs reset"
        self._sampled = 0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        """Start a new peak from the current RSS."""
        self._stop_sampler()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            self.method = "VmRSS sampled every 1 ms by a thread (clear_refs refused)"
            self._sampled = _status_kib("VmRSS")
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, _status_kib("VmRSS"))

    def _stop_sampler(self) -> None:
        if self._thread is not None and self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def peak(self) -> int:
        """Bytes: the highest RSS since :meth:`reset`."""
        if self._thread is not None:
            self._stop_sampler()
            return max(self._sampled, _status_kib("VmRSS")) * 1024
        return _status_kib("VmHWM") * 1024


def measure_in_this_process(name: str, width: int, batch: int, device: torch.device, root: Path) -> dict[str, Any]:
    """The child's work: peak RSS of a loop without saves, then of the same loop saving with row ``name``."""
    model, optimizer = make_model(width, device)
    data = make_data(STEPS, batch, width, device)
    peak = PeakRss()
    run_loop(None, model, optimizer, data[:2], root, EVERY, device)  # AdamW state exists, allocator warm
    peak.reset()
    run_loop(None, model, optimizer, data, root, EVERY, device)
    without = peak.peak()
    peak.reset()
    run_loop(name, model, optimizer, data, root, EVERY, device)
    with_saves = peak.peak()
    return {"row": name, "peak_rss_without_saves_bytes": without, "peak_rss_with_saves_bytes": with_saves,
            "extra_peak_bytes": with_saves - without, "saves": STEPS // EVERY, "method": peak.method}


def describe(record: dict[str, Any]) -> str:
    """How the memory column was measured, for the report's header line."""
    return (f"one fresh subprocess per row, peak RSS ({record['method']}) of {STEPS} steps saving every {EVERY} "
            f"minus the same {STEPS} steps without saves")


def measure_rows(names: list[str], width: int, batch: int, device: torch.device, root: Path, *,
                 threads: int | None, jobs: int = 1) -> dict[str, dict[str, Any]]:
    """Run :func:`measure_in_this_process` for each row in a fresh subprocess (``jobs`` at a time)."""

    def one(name: str) -> dict[str, Any]:
        progress(f"extra peak memory: {name} (a fresh subprocess)")
        command = [sys.executable, str(SCRIPT), "--memory-row", name, "--width", str(width), "--batch", str(batch),
                   "--device", str(device), "--dir", str(root)]
        if threads is not None:
            command += ["--threads", str(threads)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"the memory subprocess for {name!r} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(zip(names, pool.map(one, names)))
