"""A small checkpoint serialized on the training thread, so the writer thread only hashes and writes it.

A background save normally copies the payload's tensors (the snapshot) and
leaves ``torch.save`` to the writer thread. For a small payload on the CPU
that division of labour costs more than it saves: pickling a training state
is a few thousand Python calls, and on the writer thread they hold the
interpreter lock that the training loop needs, so the loop waits for them
anyway, plus the snapshot copy and the lock hand-overs. Serializing such a
payload in place is cheaper: the archive *is* the snapshot (later steps
cannot change it), and what is left for the writer — hashing, writing,
fsync, rename, the index — mostly runs outside the lock.

The archive holds the same bytes ``torch.save`` would stream into the file,
so a checkpoint is byte for byte the same either way.

>>> import torch
>>> small = serialize_small({"w": torch.ones(2), "meta": {"step": 1}})
>>> small.archive[:2], small.meta
(b'PK', {'step': 1})
>>> serialize_small({"w": torch.ones(2)}, limit_bytes=4) is None  # 8 bytes of tensors: too big
True
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import torch

from engine_kit.checkpoint.payload_types import loadable_tensors

INLINE_LIMIT_BYTES = 4 * 1024 * 1024
"""Tensor bytes up to which a background save serializes on the training thread.

Above it, copying the tensors (a memcpy) is cheaper for the training thread than serializing them."""


@dataclasses.dataclass(frozen=True)
class SerializedPayload:
    """A payload already turned into its ``torch.save`` archive.

    Attributes:
        archive: the archive's bytes, as ``torch.save`` writes them.
        meta: the payload's ``"meta"`` dict (None when it had none).
    """

    archive: bytes
    meta: dict[str, Any] | None


def serialize_small(payload: dict[str, Any], *, limit_bytes: int = INLINE_LIMIT_BYTES) -> SerializedPayload | None:
    """``payload``'s archive, when it is small enough to serialize here; else None (take a snapshot instead).

    None also when a tensor is not on the CPU (serializing it here would wait
    for the device), or when the payload cannot be saved at all: the writer
    then meets the same problem and reports it as any background save does.

    Args:
        payload: the state about to be saved.
        limit_bytes: the most tensor bytes (storages, counted per tensor) serialized here.
    """
    tensors = loadable_tensors(payload)
    if tensors is None:
        return None
    total = 0
    for tensor in tensors:
        if tensor.device.type != "cpu":
            return None
        total += tensor.untyped_storage().nbytes()
        if total > limit_bytes:
            return None
    buffer = io.BytesIO()
    try:
        torch.save(payload, buffer)
    except Exception:  # noqa: BLE001  the writer serializes again and names the failure
        return None
    meta = payload.get("meta")
    return SerializedPayload(buffer.getvalue(), meta if isinstance(meta, dict) else None)
