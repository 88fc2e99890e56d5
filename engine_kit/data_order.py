"""Exact, resumable data order: every batch is a pure function of (seed, epoch).

A run killed mid-epoch and resumed must see the very batches the uninterrupted
run saw: same samples, same order, same random augmentation, whatever the
number of workers. Three pieces make that true:

* the order of epoch ``e`` is ``randperm(n)`` from a private generator seeded
  with ``mix_seed(seed, e)``, so it never reads the global RNG;
* the batch sampler starts at batch ``consumed``, so skipped batches are never
  loaded, and pairs each index with a seed derived from (seed, epoch, position);
* a dataset wrapper seeds torch/random/numpy with that seed right before
  loading the sample, so augmentation depends neither on the worker that loads
  it nor on what was loaded before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from engine_kit.dataset_fingerprint import dataset_fingerprint
from engine_kit.errors import fix_message
from engine_kit.seeding import host_rng_preserved, mix_seed, seed_host_rngs

__all__ = ["ResumableLoader", "dataset_fingerprint", "epoch_order", "mix_seed"]

# Salts keep the seeds of the order, the samples, the workers and the
# DataLoader's generator independent although all derive from (seed, epoch).
_ORDER, _SAMPLE, _WORKER, _LOADER = 1, 2, 3, 4
_STATE_KEYS = ("seed", "epoch", "consumed", "batch_size", "shuffle", "drop_last", "dataset_len")
# Recorded since the dataset fingerprint and world size were added: optional when reading.
_OPTIONAL_KEYS = ("dataset_fingerprint", "num_replicas")
_MUST_MATCH = ("seed", "batch_size", "shuffle", "drop_last", "dataset_len", "dataset_fingerprint", "num_replicas")
_STATE_FIX = "pass the dict returned by ResumableLoader.state_dict()."


def epoch_order(dataset_len: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The sample order of one epoch: ``0..n-1``, or a permutation fixed by (seed, epoch).

    The permutation comes from torch's ``randperm``: stable for a given torch
    version, which checkpoints record.

    >>> epoch_order(4, seed=0, epoch=0, shuffle=False).tolist()
    [0, 1, 2, 3]
    >>> torch.equal(epoch_order(8, 3, 1), epoch_order(8, 3, 1))
    True
    """
    if not shuffle:
        return torch.arange(dataset_len)
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch, _ORDER))
    return torch.randperm(dataset_len, generator=generator)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        problem = f"{name}={value!r} is a {type(value).__name__}, not an int."
        raise TypeError(fix_message(problem, f"pass an integer >= {minimum}."))
    if value < minimum:
        raise ValueError(fix_message(f"{name}={value} is below {minimum}.", f"pass an integer >= {minimum}."))


class _ReseededDataset(Dataset):
    """Loads ``dataset[index]`` for an ``(index, sample_seed)`` key after seeding every RNG."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        if get_worker_info() is not None:
            return [self._load(index, seed) for index, seed in keys]  # a worker's RNG serves loading alone
        with host_rng_preserved():
            return [self._load(index, seed) for index, seed in keys]

    def _load(self, index: int, seed: int) -> Any:
        seed_host_rngs(seed)
        return self.dataset[index]


class _WorkerSeeder:
    """``worker_init_fn``: seed a worker from (seed, epoch, rank, worker_id), then call the user's."""

    def __init__(self, seed: int, rank: int, user_fn: Callable[[int], None] | None) -> None:
        self.seed, self.rank, self.user_fn = seed, rank, user_fn
        self.epoch = 0  # set before each DataLoader iterator, hence its workers, is created

    def __call__(self, worker_id: int) -> None:
        seed_host_rngs(mix_seed(self.seed, self.epoch, _WORKER, self.rank, worker_id))
        if self.user_fn is not None:
            self.user_fn(worker_id)


@dataclass(frozen=True)
class _Plan:
    """Everything the batches of an epoch depend on, besides the epoch."""

    dataset_len: int
    batch_size: int
    seed: int
    shuffle: bool
    drop_last: bool
    num_replicas: int
    rank: int

    def __post_init__(self) -> None:
        _check_int("batch_size", self.batch_size, 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            problem = f"seed={self.seed!r} is a {type(self.seed).__name__}, not an int."
            raise TypeError(fix_message(problem, "pass an integer seed."))
        _check_int("num_replicas", self.num_replicas, 1)
        _check_int("rank", self.rank, 0)
        if self.rank >= self.num_replicas:
            problem = f"rank={self.rank} is not below num_replicas={self.num_replicas}."
            raise ValueError(fix_message(problem, f"pass 0 <= rank < {self.num_replicas}."))

    @property
    def samples_per_rank(self) -> int:
        return math.ceil(self.dataset_len / self.num_replicas)

    @property
    def num_batches(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return rounding(self.samples_per_rank / self.batch_size)


class _EpochBatches:
    """Batch sampler over this rank's share of one epoch, from batch ``start`` on.

    It holds the plan, never the loader: a reference cycle through a DataLoader
    with persistent workers stalls its garbage collection for ~10 s.
    """

    def __init__(self, plan: _Plan, reseed: bool) -> None:
        self.plan, self.reseed = plan, reseed
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.plan.num_batches - self.start

    def __iter__(self) -> Iterator[list[Any]]:
        # Snapshot now (the DataLoader calls iter() as its own iterator is
        # created): a later set_position must not alter an epoch in flight.
        plan, total = self.plan, self.plan.samples_per_rank * self.plan.num_replicas
        order = epoch_order(plan.dataset_len, plan.seed, self.epoch, plan.shuffle)
        if total > len(order):  # pad like DistributedSampler: repeat the first indices
            order = torch.cat([order, order.repeat(math.ceil(total / len(order)))[: total - len(order)]])
        positions = range(plan.rank, total, plan.num_replicas)
        return self._batches(order[plan.rank :: plan.num_replicas].tolist(), positions, self.epoch, self.start)

    def _batches(self, indices: list[int], positions: range, epoch: int, start: int) -> Iterator[list[Any]]:
        size, seed = self.plan.batch_size, self.plan.seed
        for b in range(start, self.plan.num_batches):
            lo, hi = b * size, min((b + 1) * size, len(indices))
            if self.reseed:
                yield [(i, mix_seed(seed, epoch, _SAMPLE, p)) for i, p in zip(indices[lo:hi], positions[lo:hi])]
            else:
                yield indices[lo:hi]


class ResumableLoader:
    """A DataLoader whose batches are a pure function of (seed, epoch) and that resumes mid-epoch.

    ``set_position(epoch, consumed)`` picks the epoch and how many of its
    batches were already consumed; iterating then yields the rest without
    loading the skipped ones. Nothing advances on its own: the trainer calls
    ``set_position`` at every epoch start, and iterating twice without it
    replays the same epoch from the same position.

    Iteration is lazy: the position is read at the first ``next()``, not at
    ``iter()``, because ignite creates its iterator before the EPOCH_STARTED
    handler that calls ``set_position`` runs.

    Distributed: ``num_replicas``/``rank`` default to ``torch.distributed``'s
    world size and rank when it is initialized, else 1 and 0. Each rank takes
    the strided share ``order[rank::num_replicas]``, the order padded by
    repeating its first indices so that every rank gets as many batches.

    Args:
        dataset: a map-style dataset with ``__len__``.
        batch_size: samples per batch; the last is smaller unless ``drop_last``.
        shuffle: permute the order each epoch; ``False`` gives ``0..n-1``.
        seed: the seed the whole data order derives from.
        drop_last: drop the last partial batch.
        num_workers: passed to ``torch.utils.data.DataLoader``, like the four below.
        collate_fn: builds a batch from a list of samples.
        pin_memory: copy batches into pinned memory.
        persistent_workers: keep workers between epochs (they are then seeded
            once, for the first epoch; per-sample seeds are unaffected).
        prefetch_factor: batches loaded ahead by each worker.
        reseed_samples: seed torch/random/numpy per sample so that random
            augmentation is reproducible; ``False`` passes plain indices.
        worker_init_fn: called in each worker after its seeding.
        num_replicas: distributed ranks sharing each epoch.
        rank: this process's rank.

    >>> loader = ResumableLoader(list(range(10)), batch_size=4, shuffle=False)
    >>> len(loader)
    3
    >>> loader.set_position(epoch=0, consumed=1)
    >>> [batch.tolist() for batch in loader]
    [[4, 5, 6, 7], [8, 9]]
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        reseed_samples: bool = True,
        worker_init_fn: Callable[[int], None] | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        from engine_kit.checks import check_bool, check_callable, check_optional_int

        for flag, value in (("shuffle", shuffle), ("drop_last", drop_last), ("pin_memory", pin_memory),
                            ("persistent_workers", persistent_workers), ("reseed_samples", reseed_samples)):
            check_bool(flag, value)
        check_callable("collate_fn", collate_fn, "collate_fn(list_of_samples) -> batch, or None")
        check_callable("worker_init_fn", worker_init_fn, "worker_init_fn(worker_id) -> None, or None")
        check_optional_int("prefetch_factor", prefetch_factor, minimum=1)
        replicas = _resolve_replicas(num_replicas, rank)
        self._plan = _Plan(_dataset_length(dataset), batch_size, seed, bool(shuffle), bool(drop_last), *replicas)
        _check_int("num_workers", num_workers, 0)
        if num_workers == 0 and (persistent_workers or prefetch_factor is not None):
            problem = (
                f"persistent_workers={persistent_workers!r} and prefetch_factor={prefetch_factor!r} "
                "need worker processes, but num_workers=0."
            )
            raise ValueError(fix_message(problem, "pass num_workers >= 1, or leave both at their defaults."))
        self._dataset = dataset
        self._epoch, self._consumed = 0, 0
        self._batches = _EpochBatches(self._plan, reseed_samples)
        self._seeder = _WorkerSeeder(seed, self._plan.rank, worker_init_fn)
        # The DataLoader draws its base seed from this generator rather than
        # from the global RNG the training loop relies on.
        self._generator = torch.Generator()
        self._loader_kwargs = {
            "num_workers": num_workers, "collate_fn": collate_fn, "pin_memory": pin_memory,
            "persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor,
        }
        self._wrapped = _ReseededDataset(dataset) if reseed_samples else dataset
        self._loader: DataLoader | None = None  # built at the first next(), reused after
        self._fingerprint: str | None = None  # computed at the first state_dict()

    def __len__(self) -> int:
        """Batches of a full epoch on this rank, whatever ``consumed`` is."""
        return self._plan.num_batches

    def set_position(self, epoch: int, consumed: int = 0) -> None:
        """Make the next iteration run epoch ``epoch`` (0-based) after its first ``consumed`` batches."""
        _check_int("epoch", epoch, 0)
        _check_int("consumed", consumed, 0)
        if consumed > len(self):
            problem = f"consumed={consumed} exceeds the {len(self)} batches of an epoch."
            raise ValueError(fix_message(problem, f"pass 0 <= consumed <= len(loader) = {len(self)}."))
        self._epoch, self._consumed = epoch, consumed

    def __iter__(self) -> Iterator[Any]:
        """Yield the current epoch's batches after ``consumed``, reading the position at the first ``next()``."""
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        epoch, consumed = self._epoch, self._consumed
        if consumed >= len(self):
            return  # nothing left: start no workers
        self._batches.epoch, self._batches.start = epoch, consumed
        self._seeder.epoch = epoch
        self._generator.manual_seed(mix_seed(self._plan.seed, epoch, _LOADER))
        if self._loader is None:
            self._loader = DataLoader(
                self._wrapped, batch_sampler=self._batches, worker_init_fn=self._seeder,
                generator=self._generator, **self._loader_kwargs,
            )
        yield from self._loader

    def state_dict(self) -> dict[str, Any]:
        """The position plus the settings a resumed run must share.

        >>> ResumableLoader(range(5), 2, seed=7).state_dict()["dataset_len"]
        5
        """
        plan = self._plan
        return {
            "seed": plan.seed, "epoch": self._epoch, "consumed": self._consumed, "batch_size": plan.batch_size,
            "shuffle": plan.shuffle, "drop_last": plan.drop_last, "dataset_len": plan.dataset_len,
            "dataset_fingerprint": self.dataset_fingerprint(), "num_replicas": plan.num_replicas,
        }

    def dataset_fingerprint(self) -> str:
        """A short hash of the dataset's length, type and a few samples: another dataset gives another one.

        The samples (first, middle, last) are loaded once, with every RNG seeded
        and then put back, so random augmentation neither changes the hash nor
        disturbs the training loop.

        >>> ResumableLoader([1, 2, 3], 2).dataset_fingerprint() == ResumableLoader([1, 2, 3], 3).dataset_fingerprint()
        True
        >>> ResumableLoader([1, 2, 3], 2).dataset_fingerprint() == ResumableLoader([1, 2, 4], 2).dataset_fingerprint()
        False
        """
        if self._fingerprint is None:
            self._fingerprint = dataset_fingerprint(self._dataset)
        return self._fingerprint

    def state_differences(self, state: Mapping[str, Any]) -> list[str]:
        """Each saved setting that differs from this loader's, as ``"name: saved X vs live Y"`` (empty: it fits)."""
        mine = self.state_dict()
        return [f"{k}: checkpoint {state[k]!r} vs live {mine[k]!r}" for k in self._differing(state, mine)]

    @staticmethod
    def _differing(state: Mapping[str, Any], mine: Mapping[str, Any]) -> list[str]:
        return [k for k in _MUST_MATCH if k in state and state[k] != mine[k]]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the position from ``state_dict()``; refuse, changing nothing, a state of other settings."""
        if not isinstance(state, Mapping):
            problem = f"the data-order state is a {type(state).__name__}, not a dict."
            raise TypeError(fix_message(problem, _STATE_FIX))
        known = set(_STATE_KEYS) | set(_OPTIONAL_KEYS)
        missing, unexpected = sorted(set(_STATE_KEYS) - set(state)), sorted(set(state) - known)
        if missing or unexpected:
            problem = f"the data-order state has missing keys {missing} and unexpected keys {unexpected}."
            raise ValueError(fix_message(problem, _STATE_FIX))
        mine = self.state_dict()
        differ = [f"{k}={state[k]!r} (this loader: {mine[k]!r})" for k in self._differing(state, mine)]
        if differ:
            problem = f"the saved data order does not match this loader: {', '.join(differ)}."
            fix = "build the loader with the seed, batch_size, shuffle, drop_last, dataset and world size of that run."
            raise ValueError(fix_message(problem, fix))
        self.set_position(state["epoch"], state["consumed"])

    @property
    def dataset(self) -> Any:
        """The user's dataset."""
        return self._dataset

    @property
    def batch_size(self) -> int:
        """Samples per batch."""
        return self._plan.batch_size

    @property
    def epoch(self) -> int:
        """Epoch of the next iteration (0-based)."""
        return self._epoch

    @property
    def consumed(self) -> int:
        """Batches of that epoch the next iteration skips."""
        return self._consumed

    @property
    def num_replicas(self) -> int:
        """Distributed ranks sharing each epoch."""
        return self._plan.num_replicas

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self._plan.rank


def _dataset_length(dataset: Any) -> int:
    name = type(dataset).__name__
    if isinstance(dataset, IterableDataset):
        problem = f"{name} is an IterableDataset, which has no index order to resume from."
        raise TypeError(fix_message(problem, "pass a map-style dataset (with __getitem__ and __len__)."))
    try:
        length = len(dataset)
    except TypeError:
        fix = "give the dataset a __len__ returning its number of samples."
        raise TypeError(fix_message(f"the dataset {name} has no __len__.", fix)) from None
    if length == 0:
        raise ValueError(fix_message(f"the dataset {name} is empty (len 0).", "pass a non-empty dataset."))
    return length


def _resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    return num_replicas, rank
