"""``torchrun`` launches of a 2-process run (gloo, CPU) that crash and are started again.

Every launch is the README's recipe (``tests/distributed/train_script.py``):
DDP through ``idist.auto_model``, accumulation 2, clipping, a shuffled
``ResumableLoader``, ``Validation``, ``CheckpointRotation(every_steps=8,
keep_last=2, resume="auto")``, dropout and ``manual_seed(seed + rank)``.
A crashed run started again with the same command must end bit-identical to
an uninterrupted run on every rank: final parameters, the loss of every step
and each rank's random stream after the run.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "distributed" / "train_script.py"
RANKS = (0, 1)
LAUNCH_TIMEOUT_S = 240


def start(run: Path, *extra: str, nproc: int = 2, checkpoints: str | None = None) -> subprocess.Popen:
    """Start ``torchrun --standalone --nproc-per-node N train_script.py`` for the run in ``run``."""
    run.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(SCRIPT),
        "--dir", checkpoints or str(run / "checkpoints"), "--out", str(run / "result-{rank}.json"), *extra,
    ]
    return subprocess.Popen(cmd, cwd=run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, expect_ok: bool = True) -> str:
    output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    if expect_ok:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-4000:]}"
    else:
        assert proc.returncode != 0, f"the launch was expected to fail\n{output[-4000:]}"
    return output


def results(run: Path, ranks: tuple[int, ...] = RANKS) -> list[dict]:
    return [json.loads((run / f"result-{r}.json").read_text()) for r in ranks]


def assert_bit_identical(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want):
        rank = g["rank"]
        assert g["losses"] == w["losses"], f"rank {rank}: per-step losses differ"
        assert g["params"] == w["params"], f"rank {rank}: final parameters differ"
        assert g["next_random"] == w["next_random"], f"rank {rank}: its random stream differs"
        assert g["optimizer_steps"] == w["optimizer_steps"] == 18


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    run = tmp_path_factory.mktemp("uninterrupted")
    finish(start(run))
    return results(run)


def test_a_fresh_launch_killed_on_rank1_and_started_again_ends_bit_identical(tmp_path):
    # Both launches are fresh (no pre-created checkpoint directory: rank 1 must not race rank 0's mkdir).
    reference, run = tmp_path / "uninterrupted", tmp_path / "killed"
    procs = [start(reference), start(run, "--kill-rank", "1", "--kill-at-iteration", "21")]  # mid-window, after step 8's save
    finish(procs[0])
    finish(procs[1], expect_ok=False)
    assert not (run / "result-0.json").exists()
    output = finish(start(run))
    got = results(run)
    assert [g["resumed_at_step"] for g in got] == [8, 8], output[-3000:]
    assert got[0]["resumed_from"] == got[1]["resumed_from"]
    assert_bit_identical(got, results(reference))


@pytest.mark.slow
def test_ranks_given_different_checkpoint_directories_stop_together_with_one_clear_error(tmp_path):
    started = time.monotonic()
    output = finish(start(tmp_path, checkpoints=str(tmp_path / "node-local-{rank}")), expect_ok=False)
    assert time.monotonic() - started < 60 + 30  # 60 s for the check itself, the rest is process start-up
    lines = [line for line in output.splitlines() if "RankAgreementError" in line and "do not share one directory" in line]
    assert any("[rank0]" in line for line in lines) and any("[rank1]" in line for line in lines), output[-4000:]
    assert "To fix: pass every rank the same directory on storage all nodes share" in output


@pytest.mark.slow
def test_ten_fresh_launches_all_succeed(tmp_path):
    for pair in range(5):  # two launches at a time: both cores busy
        procs = [start(tmp_path / f"launch{2 * pair + i}") for i in range(2)]
        for proc in procs:
            finish(proc)


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(3))
def test_rank0_killed_mid_save_then_started_again_ends_bit_identical(tmp_path, uninterrupted, attempt):
    rng = random.Random(attempt)
    save, delay = rng.choice([2, 3, 4]), rng.choice([0.0, 0.002, 0.01, 0.03])
    run = tmp_path / "killed"
    finish(start(run, "--kill-rank0-at-save", str(save), "--kill-delay", str(delay)), expect_ok=False)
    output = finish(start(run))
    got = results(run)
    assert got[0]["resumed_at_step"] == got[1]["resumed_at_step"], output[-3000:]
    assert_bit_identical(got, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)])
def test_another_number_of_processes_is_refused_naming_the_world_size(tmp_path, first, second):
    run = tmp_path / "run"
    finish(start(run, "--kill-rank", "0", "--kill-at-iteration", "30", nproc=first), expect_ok=False)
    output = finish(start(run, nproc=second), expect_ok=False)
    assert "world size: checkpoint" in output, output[-4000:]


@pytest.mark.slow
def test_a_rank_with_an_older_copy_of_the_directory_stops_every_rank(tmp_path):
    shared = tmp_path / "shared"
    finish(start(tmp_path, "--kill-rank", "0", "--kill-at-iteration", "30", checkpoints=str(shared)), expect_ok=False)
    older = tmp_path / "older"  # rank 1's stale view: the registry and the oldest checkpoint only
    older.mkdir()
    oldest = min(p.name for p in shared.glob("*.ekpt"))
    for path in [shared / "registry.json", shared / oldest]:
        (older / path.name).write_bytes(path.read_bytes())
    views = str(tmp_path / "view{rank}")
    (tmp_path / "view0").symlink_to(shared)
    (tmp_path / "view1").symlink_to(older)
    output = finish(start(tmp_path, checkpoints=views), expect_ok=False)
    assert "RankAgreementError" in output and "To fix:" in output
