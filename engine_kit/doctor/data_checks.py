"""Checks of the data: validation order and overlap, batches' device, time spent waiting for batches."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

from engine_kit.data_order import ResumableLoader
from engine_kit.doctor.findings import DoctorSettings, Finding
from engine_kit.doctor.item_digests import count_identical


def shuffle_reason(loader: Any) -> str | None:
    """Why ``loader`` yields its samples in a random order, or None when it does not.

    >>> shuffle_reason(DataLoader(list(range(4)), shuffle=True))
    'its sampler is a RandomSampler (shuffle=True)'
    >>> shuffle_reason(DataLoader(list(range(4)))) is None
    True
    """
    if isinstance(loader, ResumableLoader):
        return "it is a ResumableLoader built with shuffle=True" if loader.state_dict()["shuffle"] else None
    if not isinstance(loader, DataLoader):
        return None
    samplers = [("sampler", loader.sampler)]
    if loader.batch_sampler is not None:
        samplers.append(("batch_sampler's sampler", getattr(loader.batch_sampler, "sampler", None)))
    for where, sampler in samplers:
        if isinstance(sampler, RandomSampler):
            return f"its {where} is a RandomSampler (shuffle=True)"
        if isinstance(sampler, DistributedSampler) and sampler.shuffle:
            return f"its {where} is a DistributedSampler with shuffle=True"
    return None


def footprint(data: Any) -> tuple[Any, set[int] | None]:
    """The base dataset that ``data`` (a loader or a dataset) draws from, and which of its indices (None: all).

    >>> base = torch.utils.data.TensorDataset(torch.arange(4.0))
    >>> footprint(Subset(Subset(base, [3, 2, 1]), [0, 2])) == (base, {1, 3})
    True
    """
    dataset = data.dataset if hasattr(data, "dataset") and not isinstance(data, Subset) else data
    indices: list[int] | None = None
    # A Subset of a Subset indexes into its parent: compose down to the base dataset.
    while isinstance(dataset, Subset):
        own = [int(i) for i in dataset.indices]
        indices = own if indices is None else [own[j] for j in indices]
        dataset = dataset.dataset
    return dataset, None if indices is None else set(indices)


def shared_samples(train_data: Any, val_data: Any) -> int | None:
    """How many validation samples are also training samples; None when unknown or none.

    Both arguments may be loaders (their ``.dataset`` is used) or datasets;
    ``Subset``s (nested too) are resolved to their base dataset and indices.
    Data of unrelated objects never overlaps here: only identity is compared
    (``identical_items`` compares contents).

    >>> base = torch.utils.data.TensorDataset(torch.arange(10.0))
    >>> shared_samples(Subset(base, range(0, 6)), Subset(base, range(4, 10)))
    2
    >>> shared_samples(Subset(base, range(0, 5)), Subset(base, range(5, 10))) is None
    True
    """
    train_base, train_idx = footprint(train_data)
    val_base, val_idx = footprint(val_data)
    if train_base is not val_base:
        return None
    if train_idx is None and val_idx is None:
        shared = len(val_base) if hasattr(val_base, "__len__") else 1
    elif train_idx is None:
        shared = len(val_idx)  # type: ignore[arg-type]
    elif val_idx is None:
        shared = len(train_idx)
    else:
        shared = len(train_idx & val_idx)
    return shared or None


def identical_items(train_data: Any, val_data: Any, settings: DoctorSettings) -> tuple[int, int, int] | None:
    """``(identical, validation items hashed, training items hashed)``; None when either side cannot be indexed.

    Inputs are compared byte for byte on a spread-out sample of each side
    (``settings.hash_val_items`` and ``settings.hash_train_items`` items); the
    training count is of distinct items. Reading items runs any random
    augmentation, so every global random generator is saved and restored
    around it: the run's random stream is left untouched.

    >>> data = torch.utils.data.TensorDataset(torch.arange(8.0).reshape(8, 1))
    >>> copy = torch.utils.data.TensorDataset(torch.arange(4.0, 6.0).reshape(2, 1))
    >>> identical_items(data, copy, DoctorSettings())
    (2, 2, 8)
    """
    train, val = footprint(train_data)[0], footprint(val_data)[0]
    if not all(hasattr(d, "__len__") and hasattr(d, "__getitem__") for d in (train, val)):
        return None
    try:
        return count_identical(train, val, settings.hash_val_items, settings.hash_train_items)
    except Exception:  # noqa: BLE001 - a dataset we cannot read item by item is simply not compared
        return None


def check_validation_data(train_data: Any, val_loader: Any, settings: DoctorSettings) -> list[Finding]:
    """A shuffled validation loader; validation samples that are training samples (shared or identical).

    >>> base = torch.utils.data.TensorDataset(torch.arange(10.0))
    >>> [f.code for f in check_validation_data(base, DataLoader(base, shuffle=True), DoctorSettings())]
    ['validation-shuffled', 'validation-overlap']
    """
    findings = []
    reason = shuffle_reason(val_loader)
    if reason is not None:
        findings.append(Finding(
            "validation-shuffled",
            f"the validation loader shuffles: {reason}; metrics need no random order, and a shuffled "
            "validation loader is usually the training loader passed by mistake.",
            "build the validation loader with shuffle=False from the held-out data.",
        ))
    if train_data is None:
        return findings
    shared = shared_samples(train_data, val_loader)
    fix = ("split the dataset into disjoint parts, e.g. torch.utils.data.random_split(dataset, [0.8, 0.2]), "
           "and validate on the held-out one only.")
    if shared is not None:
        base = footprint(val_loader)[0]
        findings.append(Finding(
            "validation-overlap",
            f"{shared} validation samples are also training samples (both draw from the same "
            f"{type(base).__name__}): validation metrics overstate generalization.", fix,
        ))
        return findings
    identical = identical_items(train_data, val_loader, settings)
    if identical is not None and identical[0] > 0:
        same, val_count, train_count = identical
        findings.append(Finding(
            "validation-overlap",
            f"{same} of {val_count} sampled validation items are byte-identical to one of {train_count} sampled "
            "training items: validation metrics overstate generalization.",
            fix + " Remove duplicates across the split (hash the inputs) before splitting.",
        ))
    return findings


def tensors_of(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a batch (tuples, lists and dicts, nested).

    >>> [t.shape[0] for t in tensors_of((torch.zeros(2), {"y": [torch.zeros(3)]}))]
    [2, 3]
    """
    found, stack = [], [batch]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            stack.extend(reversed(value))
        elif isinstance(value, dict):
            stack.extend(reversed(list(value.values())))
    return found


def check_batch_device(batch: Any, device: torch.device, iteration: int) -> list[Finding]:
    """Batch tensors on an accelerator other than the training device: a device-to-device copy every step.

    CPU batches are the normal case (the step copies them once, pinned or not);
    a batch already on another accelerator, or on one while training on the
    CPU, means the data pipeline moved it to the wrong place.

    >>> check_batch_device((torch.zeros(2), torch.zeros(2)), torch.device("cpu"), 1)
    []
    >>> [f.code for f in check_batch_device((torch.zeros(2, device="meta"),), torch.device("cpu"), 1)]
    ['batch-device']
    """
    wrong = sorted({str(t.device) for t in tensors_of(batch) if t.device.type != "cpu" and t.device != device})
    if not wrong:
        return []
    return [Finding(
        "batch-device",
        f"the loader's batch {iteration} holds tensors on {', '.join(wrong)} while the trainer trains on "
        f"{device}: every step copies the batch across devices before using it.",
        f"keep the dataset on the CPU (with pin_memory=True for CUDA) or on {device} itself; do not move "
        "samples to another device in the dataset or collate function.",
    )]


class BatchWaitClock:
    """Times how long the loop waits for batches over a few iterations, from host clocks only.

    ``started``/``fetched`` are called when the loop asks for a batch and when
    it has it; the wait is the time between, the iteration time is from one
    request to the next within the same epoch. No device is touched.

    >>> clock = BatchWaitClock(iterations=2)
    >>> for _ in range(3):
    ...     clock.started(1); clock.fetched()
    >>> clock.done, 0.0 <= clock.share() <= 1.0
    (True, True)
    """

    def __init__(self, iterations: int) -> None:
        self.iterations = iterations
        self.waits: list[float] = []
        self.totals: list[float] = []
        self._start: float | None = None
        self._epoch: int | None = None
        self._wait: float | None = None

    @property
    def done(self) -> bool:
        return len(self.totals) >= self.iterations

    def started(self, epoch: int) -> None:
        now = time.perf_counter()
        if self._start is not None and self._wait is not None and epoch == self._epoch:
            self.waits.append(self._wait)
            self.totals.append(now - self._start)
        self._start, self._epoch, self._wait = now, epoch, None

    def fetched(self) -> None:
        if self._start is not None:
            self._wait = time.perf_counter() - self._start

    def share(self) -> float:
        total = sum(self.totals)
        return sum(self.waits) / total if total > 0 else 0.0


def loader_hints(loader: Any, device: torch.device) -> list[str]:
    """What to change in ``loader`` so batches arrive sooner.

    >>> loader_hints(DataLoader(list(range(4))), torch.device("cpu"))
    ['num_workers=0 loads on the training thread: try num_workers=4 (and persistent_workers=True)']
    """
    hints = []
    workers = getattr(loader, "num_workers", None)
    if workers == 0:
        hints.append("num_workers=0 loads on the training thread: try num_workers=4 (and persistent_workers=True)")
    elif workers:
        hints.append(f"num_workers={workers}: try more workers, or cheaper per-item work in __getitem__")
    if device.type == "cuda" and getattr(loader, "pin_memory", None) is False:
        hints.append("pin_memory=False: set pin_memory=True so the copy to the GPU overlaps compute")
    return hints


def check_data_wait(clock: BatchWaitClock, loader: Any, device: torch.device, settings: DoctorSettings,
                    step: int) -> list[Finding]:
    """Starvation: the share of iteration time spent waiting for batches above the threshold."""
    if not clock.totals:
        return []
    share = clock.share()
    mean_wait = sum(clock.waits) / len(clock.waits)
    if share <= settings.data_wait_share or mean_wait < settings.min_data_wait_s:
        return []
    hints = loader_hints(loader, device) or ["make __getitem__ cheaper, or prepare the data once ahead of training"]
    return [Finding(
        "data-starvation",
        f"the loop waited for batches {share:.0%} of the time over {len(clock.totals)} iterations "
        f"({mean_wait * 1e3:.1f} ms per batch, above the {settings.data_wait_share:.0%} limit): "
        "the model idles while data loads.",
        "; ".join(hints) + ".",
        step,
    )]
