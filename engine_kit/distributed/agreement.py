"""Rank agreement: one decision for all ranks, one outcome on all ranks, no silent wait.

A multi-process run breaks in two quiet ways: ranks decide on their own and
train apart (each picks "the newest checkpoint" from its own view of the
disk), or one rank fails and the others wait forever in the next collective.
The primitives here close both:

- :func:`decide` — rank 0 computes a value, every rank receives it (or, if
  rank 0 failed, every rank raises the same :class:`RankAgreementError`).
- :func:`agree` — every rank runs a step; if it failed on any rank, every
  rank raises the same :class:`RankAgreementError` naming the failing ranks.
- :func:`check_same` — every rank contributes a value; any difference is an
  error on every rank, listing each rank's value.
- :func:`any_rank` — true everywhere when a flag is true on some rank (a
  stop request from a signal that reached one rank only).
- :func:`barrier` — a barrier with a timeout where the backend supports one.

Outside ``torch.distributed`` (or with one process) each is a plain call, and
the step's own exception propagates unchanged.

>>> decide("choose", lambda: 3)
3
>>> agree("check", lambda: "ok")
'ok'
>>> check_same("step", 12)
12
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from engine_kit.errors import RankAgreementError, fix_message

T = TypeVar("T")

DEFAULT_BARRIER_TIMEOUT_S = 300.0


def world_size() -> int:
    """Processes in the default ``torch.distributed`` group (1 when not initialized)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 when not initialized)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_multiprocess() -> bool:
    """True when ``torch.distributed`` is initialized with more than one process."""
    return world_size() > 1


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _where() -> str:
    return f"rank {rank()} of {world_size()} on {socket.gethostname()}"


def decide(what: str, choose: Callable[[], T]) -> T:
    """Run ``choose()`` on rank 0 and return its value on every rank.

    Args:
        what: the decision, for error messages ("choose the checkpoint to resume").
        choose: called on rank 0 only; its value must pickle.

    Raises:
        RankAgreementError: on every rank, when ``choose`` raised on rank 0
            (rank 0's exception is chained).
    """
    if not is_multiprocess():
        return choose()
    message = [None, None]  # [value, failure description]
    local_error: Exception | None = None
    if rank() == 0:
        try:
            message[0] = choose()
        except Exception as exc:  # every rank must learn of it, so catch all
            local_error, message[1] = exc, _describe(exc)
    dist.broadcast_object_list(message, src=0)
    value, failure = message
    if failure is not None:
        raise RankAgreementError(f"could not {what}: rank 0 failed: {failure}", failures={0: failure}) from local_error
    return value  # type: ignore[return-value]


def agree(what: str, step: Callable[[], T]) -> T:
    """Run ``step()`` on every rank; return its value where it succeeded on all ranks.

    A failure on any rank raises :class:`RankAgreementError` on every rank, with
    the same message listing each failing rank and its error; the local
    exception, if any, is chained. The gather also acts as a barrier.

    Args:
        what: the step, for error messages ("load the checkpoint").
        step: runs on every rank.
    """
    if not is_multiprocess():
        return step()
    result: Any = None
    local_error: Exception | None = None
    try:
        result = step()
    except Exception as exc:  # reported to every rank below
        local_error = exc
    outcome = None if local_error is None else f"{_where()}: {_describe(local_error)}"
    outcomes: list[str | None] = [None] * world_size()
    dist.all_gather_object(outcomes, outcome)
    failures = {r: o for r, o in enumerate(outcomes) if o is not None}
    if failures:
        listed = "; ".join(failures.values())
        raise RankAgreementError(
            f"could not {what} on {len(failures)} of {world_size()} ranks: {listed}", failures=failures
        ) from local_error
    return result


def gather(value: T) -> list[T]:
    """Every rank's ``value``, indexed by rank, on every rank (``[value]`` with one process).

    >>> gather({"step": 4})
    [{'step': 4}]
    """
    if not is_multiprocess():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def check_same(what: str, value: T) -> T:
    """Return ``value`` if every rank passed an equal one; else raise on every rank.

    Raises:
        RankAgreementError: listing each rank's value.
    """
    values = gather(value)
    if any(v != values[0] for v in values[1:]):
        listed = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        problem = f"the ranks disagree on {what}: {listed}."
        raise RankAgreementError(
            fix_message(problem, "start every rank with the same command, code and shared checkpoint directory."),
            failures={r: repr(v) for r, v in enumerate(values) if v != values[0]},
        )
    return value


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective: an all-reduce MAX).

    The tensor lives where the backend needs it (the current CUDA device for
    NCCL), and reading the result is a host sync: call it at a cadence, not
    every iteration.

    >>> any_rank(True), any_rank(False)
    (True, False)
    """
    if not is_multiprocess():
        return bool(flag)
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def any_rank_every(flag: bool, count: int, every: int, *, now: bool = False) -> bool:
    """:func:`any_rank` at a cadence: only when ``count % every == 0`` or ``now``; else False.

    For a flag that only some rank may know (a signal delivered to one
    process): ``count`` must advance identically on every rank (optimizer
    windows, epochs), so that all ranks run the same collectives and reach the
    same answer at the same point. With one process the flag is returned as is.

    >>> any_rank_every(True, count=3, every=8), any_rank_every(True, count=8, every=8)
    (True, True)
    """
    if not is_multiprocess():
        return bool(flag)
    if not now and count % every:
        return False
    return any_rank(flag)


def barrier(timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S) -> None:
    """Wait for every rank; with gloo, fail after ``timeout_s`` naming the missing ranks.

    Other backends have no barrier timeout of their own; their process group's
    timeout applies.
    """
    if not is_multiprocess():
        return
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    else:
        dist.barrier()
