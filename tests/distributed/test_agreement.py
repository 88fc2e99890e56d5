"""Rank agreement primitives on 2 gloo processes: one value or one error on every rank, never a hang.

All checks run in one spawn of two processes (starting processes dominates
the cost); each rank writes what it saw to a JSON file the test reads.
"""

from __future__ import annotations

import json
import os

import ignite.distributed as idist
import pytest
import torch

from engine_kit.distributed import (
    agree,
    any_rank,
    barrier,
    capture_rank_rng_state,
    check_same,
    check_shared_directory,
    decide,
    gather_rank_states,
    restore_own_rank_state,
)
from engine_kit.errors import RankAgreementError
from tests.distributed.spawn import spawn_two


def _outcome(fn) -> dict:
    """What ``fn()`` did on this rank: its value, or the error type, message and failing ranks."""
    try:
        return {"value": fn()}
    except RankAgreementError as exc:
        return {"error": type(exc).__name__, "message": str(exc), "failures": sorted(exc.failures)}


def _fail_on(bad_rank: int, rank: int) -> None:
    if rank == bad_rank:
        raise FileNotFoundError(f"rank {rank} cannot see the file")


def _per_rank_rng_roundtrip(rank: int) -> bool:
    torch.manual_seed(100 + rank)
    slots = gather_rank_states(loader=None)
    expected = torch.rand(5)
    torch.manual_seed(999)  # anything: the restore must bring back this rank's own stream
    restore_own_rank_state({"ranks": slots}, None, rank)
    return torch.equal(torch.rand(5), expected) and slots[rank]["rng"]["cuda"] == []


def _worker(local_rank: int, tmp: str) -> None:
    rank = idist.get_rank()
    shared, own = os.path.join(tmp, "shared"), os.path.join(tmp, f"node-local-{rank}")
    results = {
        "decide": _outcome(lambda: decide("pick", lambda: f"chosen by rank {rank}")),
        "decide_fails": _outcome(lambda: decide("pick", lambda: _fail_on(0, rank))),
        "agree": _outcome(lambda: agree("load", lambda: rank * 10)),
        "agree_fails": _outcome(lambda: agree("load the checkpoint", lambda: _fail_on(1, rank))),
        "same": _outcome(lambda: check_same("the step", 8)),
        "differ": _outcome(lambda: check_same("the step", 8 + rank)),
        "any_one": _outcome(lambda: any_rank(rank == 1)),
        "any_none": _outcome(lambda: any_rank(False)),
        "barrier": _outcome(lambda: barrier(timeout_s=30)),
        "rng": _outcome(lambda: _per_rank_rng_roundtrip(rank)),
        "shared_dir": _outcome(lambda: check_shared_directory(shared)),
        "node_local_dir": _outcome(lambda: check_shared_directory(own, wait_s=0.5)),
        "probe_left": sorted(os.listdir(shared)),
    }
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("agreement")
    spawn_two(_worker, str(tmp))
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def test_decide_gives_rank0s_value_or_rank0s_error_to_every_rank(seen):
    assert [r["decide"] for r in seen] == [{"value": "chosen by rank 0"}] * 2
    for r in seen:
        assert r["decide_fails"]["error"] == "RankAgreementError"
        assert r["decide_fails"]["failures"] == [0]
        assert "rank 0 cannot see the file" in r["decide_fails"]["message"]
    assert seen[0]["decide_fails"]["message"] == seen[1]["decide_fails"]["message"]


def test_agree_fails_on_every_rank_when_one_rank_fails(seen):
    assert [r["agree"] for r in seen] == [{"value": 0}, {"value": 10}]
    messages = {r["agree_fails"]["message"] for r in seen}
    assert len(messages) == 1, "every rank raises the same message"
    message = messages.pop()
    assert "1 of 2 ranks" in message and "rank 1 of 2" in message and "FileNotFoundError" in message
    assert all(r["agree_fails"]["failures"] == [1] for r in seen)


def test_check_same_lists_each_ranks_value(seen):
    assert [r["same"] for r in seen] == [{"value": 8}] * 2
    for r in seen:
        assert "rank 0: 8, rank 1: 9" in r["differ"]["message"]
        assert "To fix:" in r["differ"]["message"]


def test_any_rank_and_barrier(seen):
    assert [r["any_one"] for r in seen] == [{"value": True}] * 2
    assert [r["any_none"] for r in seen] == [{"value": False}] * 2
    assert [r["barrier"] for r in seen] == [{"value": None}] * 2


def test_each_rank_gets_its_own_random_stream_back(seen):
    assert [r["rng"] for r in seen] == [{"value": True}] * 2


def test_a_directory_some_rank_does_not_see_is_refused_on_every_rank(seen):
    assert [r["shared_dir"] for r in seen] == [{"value": None}] * 2
    for r in seen:
        outcome = r["node_local_dir"]
        assert outcome["error"] == "RankAgreementError" and outcome["failures"] == [1]
        assert "do not share one directory" in outcome["message"] and "To fix:" in outcome["message"]
    assert seen[0]["probe_left"] == [], "the probe file is removed"


def test_every_primitive_is_a_plain_call_with_one_process():
    assert decide("pick", lambda: 5) == 5
    with pytest.raises(FileNotFoundError):
        agree("load", lambda: _fail_on(0, 0))  # the step's own error, unchanged
    assert check_same("step", 3) == 3 and any_rank(True) and not any_rank(False)
    barrier()
    check_shared_directory("/nonexistent/never/created")  # nothing to check with one process
    assert capture_rank_rng_state()["cuda"] == []
