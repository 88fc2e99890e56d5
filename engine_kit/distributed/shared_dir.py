"""Is the checkpoint directory one directory for every rank?

Only rank 0 writes checkpoints, and at a resume every rank loads the one
rank 0 chose, so all ranks must see the same files: a shared file system
(NFS, Lustre, a cloud file system), not node-local disks. engine_kit refuses
a directory some rank cannot see instead of copying checkpoints between
nodes: a refusal at the first launch costs nothing, while a silently
per-node directory fails at the first resume, hours later.

The check: rank 0 writes a probe file with a fresh random name, every rank
looks for that name in its own ``dirname`` (retrying briefly, for file
systems whose directory listings lag), then rank 0 removes it.
"""

from __future__ import annotations

import os
import secrets
import time

from engine_kit.distributed.agreement import agree, decide, is_multiprocess, rank
from engine_kit.errors import fix_message

PROBE_PREFIX = ".engine_kit-shared-probe-"
VISIBILITY_WAIT_S = 5.0


def _write_probe(dirname: str) -> str:
    name = PROBE_PREFIX + secrets.token_hex(8)
    os.makedirs(dirname, exist_ok=True)
    with open(os.path.join(dirname, name), "w") as f:
        f.write(f"written by rank 0 (pid {os.getpid()}) to check that every rank sees this directory\n")
        f.flush()
        os.fsync(f.fileno())
    return name


def _see_probe(dirname: str, name: str, wait_s: float) -> None:
    path = os.path.join(dirname, name)
    deadline = time.monotonic() + wait_s
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            problem = (
                f"the checkpoint directory {dirname!r} on this rank does not show the file {name!r} that rank 0 "
                f"wrote into its checkpoint directory {wait_s:.0f} s ago, so the ranks do not share one directory "
                "(node-local disks, or a different path per rank)."
            )
            fix = (
                "pass every rank the same directory on storage all nodes share (NFS, Lustre, a cloud file "
                "system), e.g. CheckpointRotation('/shared/runs/exp1/checkpoints', ...)."
            )
            raise FileNotFoundError(fix_message(problem, fix))
        time.sleep(0.05)


def check_shared_directory(dirname: str, *, wait_s: float = VISIBILITY_WAIT_S) -> None:
    """Raise on every rank unless every rank sees rank 0's ``dirname`` (a collective).

    Raises:
        RankAgreementError: naming the ranks that do not see it, with a
            ``To fix:`` asking for a shared directory.
    """
    if not is_multiprocess():
        return
    name = decide("write a probe file into the checkpoint directory", lambda: _write_probe(dirname))
    try:
        agree("see rank 0's checkpoint directory", lambda: _see_probe(dirname, name, wait_s))
    finally:
        if rank() == 0:
            os.unlink(os.path.join(dirname, name))
