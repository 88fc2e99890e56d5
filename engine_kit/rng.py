"""Capture and restore every random number generator a training run draws from.

States are stored as tensors and Python primitives only, so a checkpoint that
holds them loads under ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """Python ``random``, NumPy's global generator, torch CPU and every CUDA device.

    >>> state = capture_rng_state(); a = torch.rand(2)
    >>> restore_rng_state(state); torch.equal(a, torch.rand(2))
    True
    """
    version, mt_words, gauss_next = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        # Through numpy: building a tensor from 625 Python ints directly costs about 3x as much.
        "python": {"version": version, "state": torch.from_numpy(np.fromiter(mt_words, np.int64, len(mt_words))),
                   "gauss_next": gauss_next},
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        # Only read CUDA state where CUDA is already in use: reading it would
        # otherwise initialize a CUDA context as a side effect.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any], *, cuda: bool = True) -> None:
    """Put back what ``capture_rng_state`` returned (call it last when resuming).

    Args:
        state: what ``capture_rng_state`` returned.
        cuda: also restore the CUDA generators; ``False`` leaves them as they are
            (a resume accepted on a machine with another number of GPUs).
    """
    python = state["python"]
    random.setstate((python["version"], tuple(int(w) for w in python["state"].tolist()), python["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda and cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(
                f"the checkpoint holds RNG states for {len(cuda_states)} CUDA devices, this machine has "
                f"{torch.cuda.device_count()}. To fix: resume on a machine with the same number of GPUs."
            )
        torch.cuda.set_rng_state_all(cuda_states)


class GeneratorState:
    """Adapter giving a ``torch.Generator`` the ``state_dict`` protocol of checkpoints.

    >>> gen = torch.Generator().manual_seed(1); saved = GeneratorState(gen).state_dict()
    >>> a = torch.rand(1, generator=gen); GeneratorState(gen).load_state_dict(saved)
    >>> torch.equal(a, torch.rand(1, generator=gen))
    True
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state(), "device": str(self.generator.device)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["state"])
