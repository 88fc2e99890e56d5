"""The overlap check's digests: stacked runs of same-layout tensors hash exactly as item by item."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import engine_kit.doctor.data_checks as data_checks
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
