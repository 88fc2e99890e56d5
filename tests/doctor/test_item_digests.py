"""The overlap check's digests: stacked runs of same-layout tensors hash exactly as item by item."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import engine_kit.doctor.item_digests as data_checks
from engine_kit.doctor import DoctorSettings, identical_items


def mixed_inputs() -> list:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, 3, generator=gen)
    return [
        base[0], base[1], base[1].clone(),  # a run of one layout, with a duplicate
        base[2].t(), base[2].t().contiguous(),  # non-contiguous and its contiguous copy: same bytes
        base[3].to(torch.bfloat16), base[3].to(torch.bfloat16),  # no numpy dtype
        base[4].double(),  # same values, other bytes
        torch.arange(12).reshape(4, 3), torch.arange(12).reshape(4, 3),  # integers, same shape as the floats
        (base[5], 3), [base[5], 3],  # nested items: hashed element by element
        torch.zeros(0, 3), torch.zeros(0, 3),  # empty tensors
        torch.tensor(2.5), torch.tensor(2.5),  # scalars
        "a string",
    ]


@pytest.mark.parametrize("chunk_bytes", [1, 100, 16 << 20])
def test_stacked_digests_equal_item_by_item_digests(monkeypatch, chunk_bytes):
    monkeypatch.setattr(data_checks, "_CHUNK_BYTES", chunk_bytes)  # chunk boundaries anywhere in a run
    inputs = mixed_inputs()
    assert data_checks._digests(iter(inputs)) == [data_checks._item_digest(value) for value in inputs]


def test_digests_compare_shape_and_bytes():
    digests = data_checks._digests(mixed_inputs())
    assert digests[1] == digests[2] and digests[0] != digests[1]
    assert digests[3] == digests[4]  # a non-contiguous view and its contiguous copy: the same values
    assert data_checks._item_digest(mixed_inputs()[4].reshape(-1)) != digests[4]  # the same bytes in another shape
    assert digests[5] == digests[6]
    assert digests[7] not in (digests[0], digests[1], digests[3])  # float64 bytes differ from float32's
    assert digests[8] == digests[9] and digests[8] != digests[0]
    assert digests[10] == digests[11]  # a tuple and a list of the same values, as before
    assert digests[12] == digests[13] and digests[14] == digests[15]
    assert len(set(digests[:8])) == 5  # 0, 1=2, 3=4, 5=6, 7


def test_identical_items_across_layouts():
    gen = torch.Generator().manual_seed(1)
    train = TensorDataset(torch.randn(40, 5, generator=gen), torch.zeros(40))
    val_x = torch.cat([train.tensors[0][[3, 17, 31]], torch.randn(2, 5, generator=gen)])
    val_x[4] = train.tensors[0][9] + 1e-6  # almost the same is not the same
    assert identical_items(train, TensorDataset(val_x, torch.zeros(5)), DoctorSettings()) == (3, 5, 40)
    # The same bytes seen through a non-contiguous view still match.
    strided = TensorDataset(train.tensors[0].t().contiguous().t(), torch.zeros(40))
    assert identical_items(strided, TensorDataset(val_x, torch.zeros(5)), DoctorSettings()) == (3, 5, 40)


def reference_count(train: list, val: list) -> tuple[int, int, int]:
    """What ``count_identical`` must answer, from item-by-item digests."""
    train_digests = {data_checks._item_digest(item[0]) for item in train}
    val_digests = [data_checks._item_digest(item[0]) for item in val]
    return sum(digest in train_digests for digest in val_digests), len(val_digests), len(train_digests)


def colliding_samples() -> tuple[list, list]:
    """Training items with duplicates and with rows whose word sums collide; validation items among them."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(30, 4, 2, generator=gen)
    x[5] = x[4]  # a duplicate
    x[6] = x[7].flip(0)  # the same words in another order: the same 64-bit sum, other bytes
    x[8] = x[9].flip(0)
    x[10] = x[9]
    train = [(row, i % 3) for i, row in enumerate(x)]
    val_x = torch.stack([x[4], x[9], x[9].flip(0).flip(1), torch.randn(4, 2, generator=gen), x[6], x[6]])
    return train, [(row, 0) for row in val_x]


@pytest.mark.parametrize("chunk_bytes", [16 << 20, 100])  # one run per side (rows compared) or chunks (digests)
def test_count_identical_answers_as_digests_do(monkeypatch, chunk_bytes):
    monkeypatch.setattr(data_checks, "_CHUNK_BYTES", chunk_bytes)
    train, val = colliding_samples()
    keys = data_checks._row_keys(data_checks._stacked_rows([train[6][0], train[7][0]]))
    assert keys[0] == keys[1] and not torch.equal(train[6][0], train[7][0])  # keys collide: bytes decide
    assert data_checks.count_identical(train, val, 256, 4096) == reference_count(train, val) == (4, 6, 28)
    # Same shape and bytes under another dtype is the same item (the digest covers shape and bytes).
    as_int = [(row.view(torch.int32), 0) for row, _ in val]
    assert data_checks.count_identical(train, as_int, 256, 4096) == reference_count(train, as_int)
    # Other shapes never match; mixed layouts and non-tensor inputs go through digests.
    flat = [(row.reshape(-1), 0) for row, _ in val]
    assert data_checks.count_identical(train, flat, 256, 4096) == (0, 6, 28)
    mixed = val[:3] + [("text", 0), (torch.zeros(0), 0)] + val[3:]
    assert data_checks.count_identical(train + [("text", 1)], mixed, 256, 4096) == (5, 8, 29)


def test_count_identical_reads_an_even_spread_of_items():
    train = [(torch.full((3,), float(i)), 0) for i in range(100)]
    val = [(torch.full((3,), float(i)), 0) for i in range(0, 100, 10)]
    # 10 training items spread over 100: indices 0, 10, ..., 90, all in the validation set.
    assert data_checks.count_identical(train, val, 256, 10) == (10, 10, 10)
    assert data_checks.count_identical(train, val, 5, 7) == reference_count(
        [train[int(i * 100 / 7)] for i in range(7)], [val[2 * i] for i in range(5)])


def test_single_run_samples_are_compared_without_digests(monkeypatch):
    def no_digests(groups):
        raise AssertionError("single-run samples are compared row by row, not hashed")

    train, val = colliding_samples()
    monkeypatch.setattr(data_checks, "_group_digests", no_digests)  # every digest path goes through it
    assert data_checks.count_identical(train, val, 256, 4096) == (4, 6, 28)


@pytest.mark.parametrize("mixed_val", [False, True])
def test_the_validation_sample_is_read_before_the_training_sample(mixed_val):
    reads = []

    class Logged(torch.utils.data.Dataset):
        def __init__(self, name: str, items: list) -> None:
            self.name, self.items = name, items

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int):
            reads.append(self.name)
            return self.items[i]

    train, val = colliding_samples()
    if mixed_val:
        val = val[:2] + [("text", 0)] + val[2:]
    data_checks.count_identical(Logged("train", train), Logged("val", val), 256, 4096)
    assert reads == ["val"] * len(val) + ["train"] * len(train)
