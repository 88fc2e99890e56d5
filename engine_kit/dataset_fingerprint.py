"""A short, deterministic fingerprint of a dataset: another dataset gives another one.

Resuming with another dataset of the same length would silently train on other
samples; the fingerprint recorded with the data position catches it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from engine_kit.seeding import host_rng_preserved, mix_seed, seed_host_rngs

__all__ = ["dataset_fingerprint"]

_FINGERPRINT_SEED = 0x5EED


def _hash_sample(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        digest.update(f"{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (tuple, list)):
        digest.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _hash_sample(digest, item)
    elif isinstance(value, Mapping):
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _hash_sample(digest, value[key])
    elif isinstance(value, (int, float, str, bytes, bool)) or value is None:
        digest.update(repr(value).encode())
    elif hasattr(value, "tobytes"):  # PIL images and the like
        digest.update(type(value).__name__.encode() + value.tobytes())
    else:
        digest.update(type(value).__name__.encode())


def dataset_fingerprint(dataset: Any) -> str:
    """SHA-256 (16 hex digits) of a dataset's type, length and first, middle and last samples.

    Cheap (three samples) and deterministic: the samples are loaded with every
    RNG seeded, and the caller's RNG states are put back afterwards.

    >>> dataset_fingerprint(list(range(10))) == dataset_fingerprint(list(range(10)))
    True
    >>> dataset_fingerprint([1, 2, 3]) == dataset_fingerprint([1, 2, 4])
    False
    """
    length = len(dataset)
    digest = hashlib.sha256(f"{type(dataset).__qualname__}:{length}".encode())
    with host_rng_preserved():
        for index in sorted({0, length // 2, length - 1}):
            seed_host_rngs(mix_seed(_FINGERPRINT_SEED, index))
            _hash_sample(digest, dataset[index])
    return digest.hexdigest()[:16]
