"""Per-rank state in checkpoints: each rank's random streams and data position.

In a multi-process run every rank draws its own random numbers (dropout
masks, augmentation) from its own generators, often seeded ``seed + rank``.
A checkpoint written by rank 0 alone would hand rank 0's streams to every
rank on resume, and the resumed run would diverge at its first step. So at a
save every rank captures its own state, rank 0 gathers them into the payload
under ``"ranks"`` (one slot per rank), and at a resume each rank applies its
own slot.

CUDA: a rank captures and restores only its own device's generator
(``torch.cuda.current_device()``), never the other GPUs of its node.

>>> state = capture_rank_state(loader=None); a = torch.rand(2)
>>> restore_rank_state(state, loader=None); torch.equal(a, torch.rand(2))
True
"""

from __future__ import annotations

from typing import Any

import torch

from engine_kit.distributed.agreement import gather, world_size
from engine_kit.errors import CheckpointMismatchError, fix_message
from engine_kit.rng import capture_rng_state, restore_rng_state

RANKS_KEY = "ranks"


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def capture_rank_rng_state() -> dict[str, Any]:
    """This rank's RNG states: Python, NumPy, torch CPU and its own CUDA device only."""
    state = capture_rng_state()
    state["cuda"] = []  # the all-devices list is what must not be shared between ranks
    if _cuda_in_use():
        device = torch.cuda.current_device()
        state["cuda_device"] = {"index": device, "state": torch.cuda.get_rng_state(device)}
    return state


def restore_rank_rng_state(state: dict[str, Any]) -> None:
    """Put back :func:`capture_rank_rng_state`'s value on this rank (its own CUDA device only)."""
    restore_rng_state(state)
    own = state.get("cuda_device")
    if own is None:
        return
    if not torch.cuda.is_available():
        problem = f"the checkpoint holds this rank's CUDA RNG state (device {own['index']}) but CUDA is not available."
        raise CheckpointMismatchError(fix_message(problem, "resume on CUDA devices, as the run was saved."))
    torch.cuda.set_rng_state(own["state"], torch.cuda.current_device())


def capture_rank_state(loader: Any) -> dict[str, Any]:
    """This rank's RNG states and, when ``loader`` has ``state_dict``, its data position."""
    data = loader.state_dict() if hasattr(loader, "state_dict") else None
    return {"rng": capture_rank_rng_state(), "data": data}


def restore_rank_state(state: dict[str, Any], loader: Any) -> None:
    """Apply a :func:`capture_rank_state` value: data position first, RNG last."""
    if state.get("data") is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(state["data"])
    restore_rank_rng_state(state["rng"])


def gather_rank_states(loader: Any) -> list[dict[str, Any]] | None:
    """Every rank's :func:`capture_rank_state`, by rank (a collective); None with one process."""
    if world_size() == 1:
        return None
    return gather(capture_rank_state(loader))


def add_rank_states(payload: dict[str, Any], states: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Store :func:`gather_rank_states`'s list in ``payload`` (unchanged when None).

    ``payload["ranks"]`` gets one slot per rank and ``payload["rng"]`` rank 0's
    slot, so that no rank's CUDA generators ever receive another rank's states.
    """
    if states is not None:
        payload[RANKS_KEY] = states
        payload["rng"] = states[0]["rng"]
    return payload


def restore_own_rank_state(payload: dict[str, Any], loader: Any, rank: int) -> None:
    """Apply slot ``rank`` of ``payload["ranks"]``, when the checkpoint has one for this rank.

    A checkpoint of another world size has no slot for some ranks; the resume
    checks refuse it unless the caller accepted an inexact resume.
    """
    slots = payload.get(RANKS_KEY)
    if slots is not None and rank < len(slots):
        restore_rank_state(slots[rank], loader)
