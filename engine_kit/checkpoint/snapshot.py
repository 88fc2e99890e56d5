"""A consistent host copy of a checkpoint payload, in buffers reused from one save to the next.

A background save serializes the payload while training goes on changing
the live tensors, so the training thread first takes a snapshot:
:meth:`SnapshotBuffers.capture` copies every tensor storage the payload
references, byte for byte, into a host buffer it keeps for the next save
(allocated once, then only ``copy_`` into it), and rebuilds the payload's
containers around views of those buffers. Storage sharing is kept: tensors
that are views of one storage (tied weights, a flat parameter buffer) stay
views of one buffer, and containers keep their attributes (a state dict's
``_metadata``), so ``torch.save`` of the snapshot gives exactly the bytes
of ``torch.save`` of the payload — except that a CUDA tensor's copy is a
CPU tensor.

On CUDA the buffers are pinned and the copies ``non_blocking``: they are
queued on the current stream, before any later kernel (the next optimizer
step) can change their source, and a CUDA event recorded after them tells
the reader when the bytes have arrived (:meth:`Snapshot.wait_ready`).

Tensors whose storage is in ``shared`` are not copied (the fence mode of a
background save: the caller keeps them unchanged until the write is done).

Peak extra host memory: one copy of the payload's tensors, kept between saves.

>>> import torch
>>> buffers = SnapshotBuffers()
>>> weights = torch.ones(2)
>>> first = buffers.capture({"w": weights, "step": 1})
>>> _ = weights.add_(1)
>>> first.payload["w"], first.copied_bytes
(tensor([1., 1.]), 8)
>>> second = buffers.capture({"w": weights, "step": 2})
>>> second.payload["w"].untyped_storage().data_ptr() == first.payload["w"].untyped_storage().data_ptr()
True
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import torch

_MAPPINGS = (dict, collections.OrderedDict, collections.Counter)
_SEQUENCES = (list, tuple, set)
_TENSORS = (torch.Tensor, torch.nn.Parameter)
# Kept as they are without a call: most of a training state's leaves (counters, names, flags).
_ATOMS = frozenset({int, float, str, bool, type(None)})


def _plain(tensor: torch.Tensor) -> bool:
    """A dense tensor with data: one a snapshot can copy storage for storage."""
    return tensor.layout == torch.strided and not tensor.is_quantized and tensor.device.type != "meta"


@dataclasses.dataclass
class Snapshot:
    """A captured payload and how to know its bytes are there.

    Attributes:
        payload: the copy, same structure as the captured payload.
        copied_bytes: bytes copied into buffers (shared storages not counted).
        events: CUDA events to wait on before reading ``payload`` (empty on CPU).
    """

    payload: dict[str, Any]
    copied_bytes: int
    events: list[Any] = dataclasses.field(default_factory=list)

    def wait_ready(self) -> None:
        """Block until every copy of a CUDA tensor has landed in its host buffer (no-op on CPU)."""
        for event in self.events:
            event.synchronize()
        self.events = []


class SnapshotBuffers:
    """Host buffers for snapshots of one payload layout, reused across captures.

    Buffers are matched to storages by their order of first appearance in
    the payload; a storage whose size or kind (pinned or not) changed gets a
    new buffer. Only one snapshot may be in use at a time: the next
    :meth:`capture` overwrites the previous one's bytes.

    Args:
        pin_memory: pin the buffers of CUDA storages (default: True when CUDA is available).
    """

    def __init__(self, *, pin_memory: bool | None = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._buffers: list[torch.UntypedStorage] = []
        # Whether each buffer is pinned, kept here: a storage's is_pinned() builds a tensor to ask.
        self._pinned: list[bool] = []
        self.allocations = 0  # buffers allocated so far (stays put once the layout is stable)

    @property
    def nbytes(self) -> int:
        """Host memory held by the buffers."""
        return sum(buffer.nbytes() for buffer in self._buffers)

    def capture(self, payload: dict[str, Any], *, shared: frozenset[int] = frozenset()) -> Snapshot:
        """Copy ``payload``'s tensors into the buffers; return the rebuilt payload.

        Args:
            payload: a dict of tensors, numbers, strings and containers of them.
            shared: ``untyped_storage()._cdata`` of storages to keep live, uncopied.

        Returns:
            The :class:`Snapshot`; call :meth:`Snapshot.wait_ready` before reading it on another thread.
        """
        capture = _Capture(self, shared)
        copied = capture.value(payload)
        events = []
        for device in capture.cuda_devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return Snapshot(copied, capture.copied_bytes, events)

    def _buffer(self, slot: int, source: torch.UntypedStorage) -> torch.UntypedStorage:
        pinned = self.pin_memory and source.device.type == "cuda"
        if slot < len(self._buffers):
            buffer = self._buffers[slot]
            if buffer.nbytes() == source.nbytes() and self._pinned[slot] == pinned:
                return buffer
        buffer = torch.UntypedStorage(source.nbytes(), device="cpu")
        if pinned:
            buffer = buffer.pin_memory()
        self.allocations += 1
        if slot < len(self._buffers):
            self._buffers[slot] = buffer
            self._pinned[slot] = pinned
        else:
            self._buffers.append(buffer)
            self._pinned.append(pinned)
        return buffer


class _Capture:
    """One walk over a payload: memoized containers, tensors and storages."""

    def __init__(self, buffers: SnapshotBuffers, shared: frozenset[int]) -> None:
        self.buffers = buffers
        self.shared = shared
        self.memo: dict[int, Any] = {}  # id(original) -> copy: shared objects stay shared
        self.storages: dict[int, torch.UntypedStorage] = {}  # source _cdata -> its buffer
        self.keep: list[Any] = []  # originals stay alive during the walk, so their ids stay theirs
        self.copied_bytes = 0
        self.cuda_devices: set[torch.device] = set()

    def value(self, value: Any) -> Any:
        kind = type(value)
        if not (kind in _MAPPINGS or kind in _SEQUENCES or (kind in _TENSORS and _plain(value))):
            # Numbers, strings, sizes, dtypes: immutable, kept. Anything else (a sparse tensor, a tensor
            # subclass, a numpy array) is kept too, for the writer's type check to refuse, naming its key.
            return value
        if id(value) in self.memo:
            return self.memo[id(value)]
        self.keep.append(value)
        if kind in _TENSORS:
            copy = self.tensor(value)
        elif kind in _MAPPINGS:
            copy = kind()
            self.memo[id(value)] = copy  # before the items: a container may contain itself
            atoms = _ATOMS
            for key, item in value.items():
                copy[key] = item if type(item) in atoms else self.value(item)
            if getattr(value, "__dict__", None):
                copy.__dict__.update(value.__dict__)  # a state dict's _metadata
        elif kind is list:
            copy = []
            self.memo[id(value)] = copy
            copy.extend(self.value(item) for item in value)
        else:
            copy = kind(self.value(item) for item in value)
        self.memo[id(value)] = copy
        return copy

    def tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata in self.shared:
            return tensor
        buffer = self.storages.get(storage._cdata)
        if buffer is None:
            slot = len(self.storages)
            buffer = self.buffers._buffer(slot, storage)
            self.storages[storage._cdata] = buffer
            nbytes = storage.nbytes()
            if nbytes:
                cuda = storage.device.type == "cuda"
                # Storage to storage, byte for byte; from CUDA into a pinned buffer it is queued, not waited for.
                buffer.copy_(storage, non_blocking=cuda and self.buffers._pinned[slot])
                self.copied_bytes += nbytes
                if cuda:
                    self.cuda_devices.add(storage.device)
        view = torch.empty(0, dtype=tensor.dtype).set_(buffer, tensor.storage_offset(), tensor.size(), tensor.stride())
        if type(tensor) is torch.nn.Parameter:
            return torch.nn.Parameter(view, requires_grad=tensor.requires_grad)
        return view.requires_grad_() if tensor.requires_grad else view
