"""CUDA per-rank RNG state: each rank captures and restores its own device only.

Skipped without CUDA; the 2-process NCCL case needs 2 GPUs. Run on a GPU
machine with `pytest tests/distributed/test_rank_state_gpu.py`.
"""

from __future__ import annotations

import json
import os

import ignite.distributed as idist
import pytest
import torch

from engine_kit.distributed import capture_rank_rng_state, gather_rank_states, restore_own_rank_state, restore_rank_rng_state
from tests.distributed.spawn import free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_the_own_cuda_device_stream_comes_back_and_no_all_devices_list_is_kept():
    torch.cuda.init()
    torch.cuda.manual_seed(3)
    state = capture_rank_rng_state()
    assert state["cuda"] == [] and state["cuda_device"]["index"] == torch.cuda.current_device()
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(99)
    restore_rank_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def _worker(local_rank: int, tmp: str) -> None:
    rank = idist.get_rank()
    torch.cuda.set_device(local_rank)
    torch.cuda.manual_seed(100 + rank)  # per-rank CUDA streams (dropout on the GPU)
    torch.rand(1, device="cuda")
    slots = gather_rank_states(loader=None)
    expected = torch.rand(4, device="cuda").tolist()
    torch.cuda.manual_seed(7)
    restore_own_rank_state({"ranks": slots}, None, rank)
    result = {"equal": torch.rand(4, device="cuda").tolist() == expected, "device": slots[rank]["rng"]["cuda_device"]["index"]}
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_nccl_ranks_each_get_their_own_cuda_stream_back(tmp_path):
    with idist.Parallel(backend="nccl", nproc_per_node=2, master_addr="127.0.0.1", master_port=free_port()) as parallel:
        parallel.run(_worker, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["equal"] for r in results] == [True, True]
    assert [r["device"] for r in results] == [0, 1]
