"""Seeds derived from integers, and loading code that leaves the caller's RNGs untouched.

Data order, per-sample augmentation and dataset fingerprints all draw from
seeds that are pure functions of (seed, epoch, position, ...), so that they
are identical in every process, worker and resumed run.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["host_rng_preserved", "mix_seed", "seed_host_rngs"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """Hash integers into a seed in ``[0, 2**63)``, identical in every process and run.

    Python's ``hash`` of an int is the int itself (neighbouring seeds would give
    correlated streams) and is salted per process for strings; splitmix64 is neither.

    >>> mix_seed(0, 1) == mix_seed(0, 1) != mix_seed(1, 0)
    True
    >>> 0 <= mix_seed(-5, 2**70) < 2**63
    True
    """
    h = 0
    for value in values:
        h = _splitmix64(h ^ (value & _MASK64))
    return h >> 1


def seed_host_rngs(seed: int) -> None:
    """Seed torch's CPU generator, ``random`` and legacy NumPy with ``seed``.

    The CPU generator only: ``torch.manual_seed`` would also reseed CUDA, whose
    stream belongs to the training step (dropout on the GPU).
    """
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])  # legacy numpy takes 32-bit words


@contextmanager
def host_rng_preserved() -> Iterator[None]:
    """Run the block, then put torch's CPU, ``random`` and NumPy RNG states back as they were.

    In the main process the global RNGs also drive the training loop (dropout,
    noise); loading or hashing data must leave them exactly as they were.

    >>> before = torch.get_rng_state()
    >>> with host_rng_preserved():
    ...     seed_host_rngs(1)
    >>> torch.equal(before, torch.get_rng_state())
    True
    """
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])
