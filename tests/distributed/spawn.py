"""Start 2 gloo processes on this machine for a test, on a free port (tests may run side by side)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import ignite.distributed as idist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two(fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(local_rank, *args)`` in 2 gloo processes; raises if one fails or dies."""
    with idist.Parallel(backend="gloo", nproc_per_node=2, master_addr="127.0.0.1", master_port=free_port()) as parallel:
        parallel.run(fn, *args)
