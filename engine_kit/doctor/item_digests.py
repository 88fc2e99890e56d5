"""Validation items byte-identical to training items: read a spread-out sample of each side and compare.

Two items are the same when their inputs (an item's first element) have the
same shape and the same bytes; any other value is compared by its ``repr``.
In general each input gets a SHA-256 digest (shape and bytes, one stacked copy
per run of same-layout tensors) and digests are compared. When each side's
sample is one run of tensors of a single layout that fits in one chunk (a
small dataset of same-size tensors, the common case), the two stacked copies
(two chunks at most in memory) are compared row by row instead: a 64-bit sum of each row's bytes finds the
rows that may be equal and only those are compared byte for byte. That
answers exactly what the digests would, without hashing every byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
from typing import Any, Iterable, Iterator

import numpy as np
import torch

# Items are stacked in chunks of at most this many bytes (memory stays bounded).
_CHUNK_BYTES = 16 << 20


def _new_digest(tensor_shape: torch.Size) -> Any:
    # SHA-256: collision resistant, and the fastest such hash where the CPU has SHA instructions.
    return hashlib.sha256(str(tensor_shape).encode())


def _tensor_bytes(tensor: torch.Tensor) -> Any:
    """The tensor's elements in C order as a buffer: no copy for a contiguous CPU tensor of a numpy dtype."""
    tensor = tensor.detach()
    try:
        return np.ascontiguousarray(tensor.numpy())
    except (TypeError, RuntimeError):  # on a device, or bf16: bytes through a copy (of the values, as stack makes)
        return tensor.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _item_digest(item: Any) -> bytes:
    """A digest of every tensor's shape and bytes and every other value's ``repr`` in ``item``, in order."""
    digest = hashlib.sha256()
    stack = [item]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            digest.update(str(value.shape).encode())
            digest.update(_tensor_bytes(value))
        elif isinstance(value, (tuple, list)):
            stack.extend(reversed(value))
        elif isinstance(value, dict):
            stack.extend(value[k] for k in sorted(value))
        else:
            digest.update(repr(value).encode())
    return digest.digest()


def _stacked_rows(tensors: list[torch.Tensor]) -> np.ndarray:
    """``tensors`` (one shape and dtype) as one ``(len(tensors), nbytes)`` uint8 array: their C-order bytes."""
    with torch.no_grad():
        return torch.stack(tensors).cpu().reshape(len(tensors), -1).view(torch.uint8).numpy()


def _same_layout_digests(tensors: list[torch.Tensor]) -> list[bytes]:
    """``_item_digest`` of each of ``tensors`` (one shape and dtype), from one stacked copy.

    >>> tensors = [torch.arange(6.0).reshape(2, 3), torch.zeros(2, 3)]
    >>> _same_layout_digests(tensors) == [_item_digest(t) for t in tensors]
    True
    """
    rows = _stacked_rows(tensors)
    buffer, size = memoryview(rows.reshape(-1)), rows.shape[1]
    shape = _new_digest(tensors[0].shape)
    digests = []
    for start in range(0, len(tensors) * size, size):
        digest = shape.copy()
        digest.update(buffer[start:start + size])
        digests.append(digest.digest())
    return digests


def _run_limit(tensor: torch.Tensor) -> int:
    """How many tensors of ``tensor``'s layout one chunk holds."""
    return max(1, _CHUNK_BYTES // max(1, tensor.nbytes))


def _runs(inputs: Iterable[Any]) -> Iterator[list[Any]]:
    """``inputs`` in order and grouped: runs of non-empty tensors of one shape and dtype (one chunk at most); any other input alone.

    Lazy: a run is handed on as soon as it ends, so at most one chunk of inputs is held.

    >>> [len(group) for group in _runs([torch.zeros(2), torch.ones(2), torch.ones(3), 7, torch.zeros(0), torch.ones(3)])]
    [2, 1, 1, 1, 1]
    """
    run: list[torch.Tensor] = []
    shape, dtype, limit = None, None, 0
    for value in inputs:
        tensor = isinstance(value, torch.Tensor) and value.numel() > 0
        if run and (not tensor or len(run) >= limit or value.dtype is not dtype or value.shape != shape):
            yield run
            run = []
        if not tensor:
            yield [value]
            continue
        if not run:  # a new run: its layout, and how many such tensors fit in one chunk
            shape, dtype, limit = value.shape, value.dtype, _run_limit(value)
        run.append(value)
    if run:
        yield run


def _is_run(group: list[Any] | None) -> bool:
    """Whether ``group`` (from ``_runs``) is a run of tensors, not a lone other input."""
    return group is not None and isinstance(group[0], torch.Tensor) and group[0].numel() > 0


def _group_digests(groups: Iterable[list[Any]]) -> list[bytes]:
    """``_item_digest`` of every input of ``_runs`` groups; a run of several is hashed from one stacked copy."""
    digests: list[bytes] = []
    for group in groups:
        if len(group) > 1:
            try:
                digests.extend(_same_layout_digests(group))
                continue
            except (TypeError, RuntimeError):  # tensors stack cannot copy (devices, layouts): one by one
                pass
        digests.extend(_item_digest(value) for value in group)
    return digests


def _digests(inputs: Iterable[Any]) -> list[bytes]:
    """``_item_digest`` of each input; runs of tensors of one shape and dtype are hashed from one stacked copy each.

    >>> inputs = [torch.zeros(2), torch.ones(2), torch.ones(3), 7, torch.ones(2, dtype=torch.int64)]
    >>> _digests(inputs) == [_item_digest(value) for value in inputs]
    True
    """
    return _group_digests(_runs(inputs))


def _row_keys(rows: np.ndarray) -> np.ndarray:
    """A 64-bit sum of each row's bytes, read as words: equal rows have equal keys (the converse is only likely).

    >>> rows = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [4, 3, 2, 1]], dtype=np.uint8)
    >>> keys = _row_keys(rows); bool(keys[0] == keys[1]), bool(keys[0] == keys[2])
    (True, False)
    """
    width = next(w for w in (8, 4, 2, 1) if rows.shape[1] % w == 0)
    return np.ascontiguousarray(rows).view(f"<u{width}").sum(axis=1, dtype=np.uint64)


def _distinct_rows(rows: np.ndarray, keys: np.ndarray) -> int:
    """How many different rows ``rows`` holds; rows whose key another row shares are compared byte for byte.

    >>> rows = np.array([[1, 2], [2, 1], [1, 2], [0, 3]], dtype=np.uint8)
    >>> _distinct_rows(rows, np.array([3, 3, 3, 3], dtype=np.uint64))
    3
    """
    ordered = np.sort(keys)
    repeated = ordered[1:] == ordered[:-1]
    if not repeated.any():  # no two rows share a key: all different
        return len(rows)
    shared = np.isin(keys, ordered[1:][repeated])
    candidates = np.ascontiguousarray(rows[shared])
    whole_rows = candidates.view(np.dtype((np.void, rows.shape[1]))).reshape(-1)  # compared as raw bytes
    return int((~shared).sum()) + len(np.unique(whole_rows))


def _rows_found(rows: np.ndarray, keys: np.ndarray, among: np.ndarray, among_keys: np.ndarray) -> int:
    """How many of ``rows`` equal, byte for byte, some row of ``among`` (``keys``: ``_row_keys`` of each side).

    >>> among = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    >>> rows = np.array([[3, 4], [4, 3], [1, 2]], dtype=np.uint8)
    >>> _rows_found(rows, _row_keys(rows), among, _row_keys(among))
    2
    """
    known = set(among_keys.tolist())
    found = 0
    for row, key in zip(rows, keys.tolist()):
        if key in known and bool((among[among_keys == key] == row).all(axis=1).any()):
            found += 1
    return found


def _sample_inputs(dataset: Any, count: int) -> Iterator[Any]:
    """The inputs (first element) of ``count`` items spread evenly over ``dataset``, read one at a time."""
    size = len(dataset)
    if size <= count:
        items: Iterable[Any] = dataset if type(dataset) in (list, tuple) else (dataset[i] for i in range(size))
    else:
        step = size / count
        items = (dataset[i] for i in sorted({int(i * step) for i in range(count)}))
    return (item[0] if isinstance(item, (tuple, list)) and item else item for item in items)


@contextlib.contextmanager
def _random_state_kept(*datasets: Any) -> Iterator[None]:
    """Restores every global random generator after reading items (a list's items are read by no code of its own)."""
    if all(type(dataset) in (list, tuple) for dataset in datasets):
        yield
        return
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def count_identical(train: Any, val: Any, val_items: int, train_items: int) -> tuple[int, int, int]:
    """``(identical, validation items read, distinct training items read)`` over samples of two datasets.

    ``val_items`` and ``train_items`` items are read from each, spread evenly;
    an item counts as identical when its input has the shape and bytes of
    some training input (the same answer as comparing ``_item_digest``s).
    Every global random generator is restored afterwards, so random
    augmentation in ``__getitem__`` leaves the run's random stream untouched.

    >>> data = [(torch.full((2,), float(i)), 0) for i in range(8)]
    >>> count_identical(data, data[2:4] + [(torch.ones(3), 0)], 256, 4096)
    (2, 3, 8)
    """
    with _random_state_kept(train, val):
        # The validation sample is read whole before the training one, as the digests alone would read them.
        val_groups = _runs(_sample_inputs(val, val_items))
        val_read = [group for group in (next(val_groups, None), next(val_groups, None)) if group is not None]
        if len(val_read) > 1:  # more than one run: digests
            val_digests = _group_digests(itertools.chain(val_read, val_groups))
            train_digests = set(_digests(_sample_inputs(train, train_items)))
        else:
            train_groups = _runs(_sample_inputs(train, train_items))
            train_read = [group for group in (next(train_groups, None), next(train_groups, None)) if group is not None]
            if len(val_read) == len(train_read) == 1 and _is_run(val_read[0]) and _is_run(train_read[0]):
                try:
                    return _compare_runs(val_read[0], train_read[0])
                except (TypeError, RuntimeError):  # tensors stack cannot copy (devices, layouts): through digests
                    pass
            val_digests = _group_digests(val_read)
            train_digests = set(_group_digests(itertools.chain(train_read, train_groups)))
    return sum(digest in train_digests for digest in val_digests), len(val_digests), len(train_digests)


def _compare_runs(val_run: list[torch.Tensor], train_run: list[torch.Tensor]) -> tuple[int, int, int]:
    """``count_identical``'s answer for two samples that are each one run: their stacked rows compared."""
    train_rows = _stacked_rows(train_run)
    train_keys = _row_keys(train_rows)
    distinct = _distinct_rows(train_rows, train_keys)
    # The digest covers the shape and the bytes (not the dtype): other shapes or sizes never match.
    if val_run[0].shape != train_run[0].shape or val_run[0].nbytes != train_run[0].nbytes:
        return 0, len(val_run), distinct
    val_rows = _stacked_rows(val_run)
    return _rows_found(val_rows, _row_keys(val_rows), train_rows, train_keys), len(val_run), distinct
