"""Tests of engine_kit.data_order: the data order is a function of (seed, epoch) and resumes exactly."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from torch.utils.data import Dataset, IterableDataset

from engine_kit.data_order import ResumableLoader, epoch_order, mix_seed


class CountingDataset(Dataset):
    """Returns its index and records every index loaded (main process only)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        self.loaded.append(index)
        return index


class AugmentedDataset(Dataset):
    """A sample is the index plus draws from torch, random and numpy: random augmentation."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> torch.Tensor:
        noise = torch.rand(3) + index
        return torch.cat([noise, torch.tensor([random.random(), np.random.rand()], dtype=torch.float32)])


def batches(loader: ResumableLoader) -> list[list[int]]:
    return [batch.tolist() for batch in loader]


def flat(batch_lists: list[list[int]]) -> list[int]:
    return [i for batch in batch_lists for i in batch]


def by_index(rows: torch.Tensor) -> torch.Tensor:
    """Rows of AugmentedDataset samples sorted by their index (the integer part of column 0)."""
    return rows[rows[:, 0].floor().argsort()]


def test_mix_seed_is_63_bit_and_order_sensitive() -> None:
    seeds = {mix_seed(0, epoch, position) for epoch in range(3) for position in range(100)}
    assert len(seeds) == 300
    assert all(0 <= s < 2**63 for s in seeds)
    assert mix_seed(1, 2) != mix_seed(2, 1)


def test_order_is_a_function_of_seed_and_epoch() -> None:
    first = batches(ResumableLoader(CountingDataset(20), 4, seed=3))
    again = batches(ResumableLoader(CountingDataset(20), 4, seed=3))
    assert first == again
    assert sorted(flat(first)) == list(range(20))
    other_seed = batches(ResumableLoader(CountingDataset(20), 4, seed=4))
    assert other_seed != first
    loader = ResumableLoader(CountingDataset(20), 4, seed=3)
    loader.set_position(epoch=1)
    assert batches(loader) != first
    assert flat(batches(loader)) == epoch_order(20, 3, 1).tolist()


def test_order_ignores_global_rng() -> None:
    torch.manual_seed(0)
    first = batches(ResumableLoader(CountingDataset(20), 4, seed=3))
    torch.manual_seed(1)
    assert batches(ResumableLoader(CountingDataset(20), 4, seed=3)) == first


def test_no_shuffle_is_sequential() -> None:
    loader = ResumableLoader(CountingDataset(10), 4, shuffle=False)
    loader.set_position(epoch=5)
    assert batches(loader) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize(("drop_last", "expected"), [(False, 3), (True, 2)])
def test_len_with_drop_last(drop_last: bool, expected: int) -> None:
    loader = ResumableLoader(CountingDataset(10), 4, drop_last=drop_last)
    assert len(loader) == expected
    assert len(batches(loader)) == expected
    loader.set_position(epoch=0, consumed=1)
    assert len(loader) == expected  # len is the full epoch, whatever was consumed
    assert all(len(b) == 4 for b in batches(loader)) == drop_last


def test_skipped_batches_are_never_loaded() -> None:
    full = batches(ResumableLoader(CountingDataset(22), 4, seed=1))
    dataset = CountingDataset(22)
    loader = ResumableLoader(dataset, 4, seed=1)
    loader.set_position(epoch=0, consumed=3)
    tail = batches(loader)
    assert tail == full[3:]
    assert sorted(dataset.loaded) == sorted(flat(full[3:]))
    assert not set(dataset.loaded) & set(flat(full[:3]))


def test_consumed_equal_to_len_yields_nothing() -> None:
    dataset = CountingDataset(8)
    loader = ResumableLoader(dataset, 4)
    loader.set_position(epoch=0, consumed=2)
    assert batches(loader) == []
    assert dataset.loaded == []


def test_iteration_is_lazy() -> None:
    loader = ResumableLoader(CountingDataset(20), 4, seed=2)
    it = iter(loader)
    loader.set_position(1, 2)
    third = next(it).tolist()
    full_epoch_1 = ResumableLoader(CountingDataset(20), 4, seed=2)
    full_epoch_1.set_position(1, 0)
    assert third == batches(full_epoch_1)[2]


def test_iterating_twice_without_set_position_replays_the_epoch() -> None:
    loader = ResumableLoader(CountingDataset(20), 4, seed=2)
    loader.set_position(2, 1)
    assert batches(loader) == batches(loader)


def test_augmentation_reproducible_and_varied_in_main_process() -> None:
    loader = ResumableLoader(AugmentedDataset(), 3, seed=5)
    first = torch.cat(list(loader))
    assert torch.equal(first, torch.cat(list(loader)))
    assert len(set(first[:, 3].tolist())) == 10  # every sample got its own random draws
    loader.set_position(epoch=1)
    second = torch.cat(list(loader))
    assert not torch.equal(by_index(first), by_index(second))  # a new epoch, a new augmentation


def test_main_process_rng_is_not_disturbed() -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()
    loader = ResumableLoader(AugmentedDataset(), 3, seed=5)
    list(loader)
    loader.set_position(epoch=1, consumed=1)
    list(loader)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    after_np = np.random.get_state()
    assert np.array_equal(after_np[1], before[2][1]) and after_np[2:] == before[2][2:]


def test_workers_give_identical_augmentation_and_resume() -> None:
    reference = ResumableLoader(AugmentedDataset(), 3, seed=5)
    reference.set_position(epoch=1)
    full = list(reference)
    workers = ResumableLoader(AugmentedDataset(), 3, seed=5, num_workers=2)
    workers.set_position(epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(full, list(workers), strict=True))
    for loader in (reference, workers):
        loader.set_position(epoch=1, consumed=2)
        assert all(torch.equal(a, b) for a, b in zip(full[2:], list(loader), strict=True))


def test_persistent_workers_follow_set_position() -> None:
    reference = ResumableLoader(AugmentedDataset(), 4, seed=9)
    persistent = ResumableLoader(AugmentedDataset(), 4, seed=9, num_workers=2, persistent_workers=True)
    for epoch, consumed in ((0, 0), (1, 1)):
        for loader in (reference, persistent):
            loader.set_position(epoch, consumed)
        assert all(torch.equal(a, b) for a, b in zip(list(reference), list(persistent), strict=True))


def test_reseed_samples_false_passes_plain_indices() -> None:
    dataset = CountingDataset(6)
    loader = ResumableLoader(dataset, 4, shuffle=False, reseed_samples=False)
    assert batches(loader) == [[0, 1, 2, 3], [4, 5]]
    assert dataset.loaded == [0, 1, 2, 3, 4, 5]


def test_resume_through_ignite_matches_uninterrupted_run() -> None:
    def run(start_iteration: int) -> list[list[int]]:
        loader = ResumableLoader(CountingDataset(14), 4, seed=8)
        engine = Engine(lambda e, batch: batch.tolist())
        seen: list[list[int]] = []

        @engine.on(Events.EPOCH_STARTED)
        def position(e: Engine) -> None:
            loader.set_position(e.state.epoch - 1, e.state.iteration - (e.state.epoch - 1) * e.state.epoch_length)

        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.output))
        if start_iteration:
            engine.load_state_dict({"iteration": start_iteration, "epoch_length": len(loader), "max_epochs": 3})
        engine.run(loader, max_epochs=3)
        return seen

    full = run(0)
    assert len(full) == 12
    assert run(6) == full[6:]


def test_state_dict_round_trip() -> None:
    loader = ResumableLoader(CountingDataset(20), 4, seed=3)
    loader.set_position(epoch=2, consumed=3)
    state = loader.state_dict()
    assert state == {
        "seed": 3, "epoch": 2, "consumed": 3, "batch_size": 4, "shuffle": True, "drop_last": False, "dataset_len": 20,
        "dataset_fingerprint": loader.dataset_fingerprint(), "num_replicas": 1,
    }
    fresh = ResumableLoader(CountingDataset(20), 4, seed=3)
    fresh.load_state_dict(state)
    assert (fresh.epoch, fresh.consumed) == (2, 3)
    assert batches(fresh) == batches(loader)


@pytest.mark.parametrize(
    ("change", "named"),
    [({"seed": 4}, "seed=4"), ({"batch_size": 5}, "batch_size=5"), ({"shuffle": False}, "shuffle=False"),
     ({"drop_last": True}, "drop_last=True"), ({"dataset_len": 21}, "dataset_len=21")],
)
def test_load_state_dict_refuses_other_settings(change: dict, named: str) -> None:
    loader = ResumableLoader(CountingDataset(20), 4, seed=3)
    state = {**loader.state_dict(), "epoch": 1, **change}
    with pytest.raises(ValueError, match=named) as info:
        loader.load_state_dict(state)
    assert "To fix:" in str(info.value)
    assert loader.epoch == 0  # nothing applied


def test_load_state_dict_validates_keys_and_position() -> None:
    loader = ResumableLoader(CountingDataset(20), 4)
    state = loader.state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['consumed'\].*To fix:"):
        loader.load_state_dict({k: v for k, v in state.items() if k != "consumed"})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        loader.load_state_dict({**state, "extra": 1})
    with pytest.raises(ValueError, match="consumed=6"):
        loader.load_state_dict({**state, "consumed": 6})
    with pytest.raises(TypeError, match="To fix:"):
        loader.load_state_dict([("seed", 0)])


class NoLen:
    def __getitem__(self, index: int) -> int:
        return index


class Stream(IterableDataset):
    def __iter__(self) -> Iterator[int]:
        return iter(range(3))


@pytest.mark.parametrize(
    ("make", "error", "named"),
    [
        (lambda: ResumableLoader(CountingDataset(4), 0), ValueError, "batch_size=0"),
        (lambda: ResumableLoader(CountingDataset(4), 2.0), TypeError, "batch_size=2.0"),
        (lambda: ResumableLoader(CountingDataset(0), 2), ValueError, "empty"),
        (lambda: ResumableLoader(NoLen(), 2), TypeError, "NoLen has no __len__"),
        (lambda: ResumableLoader(Stream(), 2), TypeError, "Stream is an IterableDataset"),
        (lambda: ResumableLoader(CountingDataset(4), 2, seed="0"), TypeError, "seed='0'"),
        (lambda: ResumableLoader(CountingDataset(4), 2, num_workers=-1), ValueError, "num_workers=-1"),
        (lambda: ResumableLoader(CountingDataset(4), 2, prefetch_factor=2), ValueError, "prefetch_factor=2"),
        (lambda: ResumableLoader(CountingDataset(4), 2, num_replicas=2, rank=2), ValueError, "rank=2"),
        (lambda: ResumableLoader(CountingDataset(4), 2).set_position(-1), ValueError, "epoch=-1"),
        (lambda: ResumableLoader(CountingDataset(4), 2).set_position(0, -1), ValueError, "consumed=-1"),
        (lambda: ResumableLoader(CountingDataset(4), 2).set_position(0, 3), ValueError, "consumed=3 exceeds the 2"),
    ],
)
def test_bad_input_is_named_with_a_fix(make: Callable[[], object], error: type, named: str) -> None:
    with pytest.raises(error, match=named) as info:
        make()
    assert "To fix:" in str(info.value)


def test_distributed_split_covers_every_index() -> None:
    full_order = epoch_order(11, 6, 2).tolist()
    shares = []
    for rank in range(2):
        loader = ResumableLoader(CountingDataset(11), 4, seed=6, num_replicas=2, rank=rank)
        loader.set_position(epoch=2)
        assert len(loader) == 2  # 6 samples per rank
        shares.append(flat(batches(loader)))
    assert [len(share) for share in shares] == [6, 6]
    assert shares[0] == full_order[0::2]
    assert sorted(shares[0] + shares[1]) == sorted(list(range(11)) + [full_order[0]])  # one padded repeat
    assert set(shares[0]) | set(shares[1]) == set(range(11))
