"""Start 2 gloo processes on this machine for a test, on a free port (tests may run side by side)."""

from __future__ import annotations

import gc
import socket
from collections.abc import Callable
from typing import Any

import ignite.distributed as idist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_then_collect(local_rank: int, fn: Callable[..., None], *args: Any) -> None:
    # Free what ``fn`` built (a DDP or FSDP model holds gloo work) while the process group still
    # exists: left to the interpreter's exit, gloo's threads sometimes abort the process (SIGABRT).
    try:
        fn(local_rank, *args)
    finally:
        gc.collect()


def spawn_two(fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(local_rank, *args)`` in 2 gloo processes; raises if one fails or dies."""
    with idist.Parallel(backend="gloo", nproc_per_node=2, master_addr="127.0.0.1", master_port=free_port()) as parallel:
        parallel.run(_run_then_collect, fn, *args)
