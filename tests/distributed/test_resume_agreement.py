"""Multi-process resume on 2 gloo processes: every rank resumes from rank 0's choice, or none changes.

One spawn runs every case in order (starting processes dominates the cost):

1. a run with ``CheckpointRotation`` saves; each rank notes its random stream after the save;
2. ``resume="auto"`` on both ranks: each gets its own stream back, and both the same step;
3. rank 1's model does not fit the checkpoint: every rank raises, rank 0's model is untouched;
4. rank 1's checkpoint directory lacks the file rank 0 chose: every rank raises, nothing applied;
5. a checkpoint written by one process: refused on every rank, naming the world size;
6. ranks with different numbers of batches per epoch: stopped at start, before any collective could hang.
"""

from __future__ import annotations

import json
import os

import ignite.distributed as idist
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from engine_kit import create_trainer
from engine_kit.checkpoint import CheckpointDirectory
from engine_kit.data_order import ResumableLoader
from engine_kit.distributed.resume import resume_every_rank
from engine_kit.errors import RankAgreementError
from handlers.checkpoint import CheckpointRotation
from tests.distributed.spawn import spawn_two

_GEN = torch.Generator().manual_seed(5)
DATA = [(torch.randn(4, generator=_GEN), torch.randn(2, generator=_GEN)) for _ in range(16)]  # the same on every rank


def _trainer(rank: int, out_features: int = 2):
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(4, out_features), torch.nn.Dropout(0.5))
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss)
    return model, trainer


def _loader() -> ResumableLoader:
    return ResumableLoader(DATA, batch_size=2, shuffle=True, seed=3)  # 4 batches per rank


def _params(model: torch.nn.Module) -> list:
    return [p.detach().clone().tolist() for p in model.parameters()]


def _resume_outcome(trainer, model, dirname: str, resume: str) -> dict:
    """Resume ``trainer`` at STARTED via ``resume_every_rank``; report the error and whether the model changed."""
    before, seen = _params(model), {}

    @trainer.on(Events.STARTED)
    def resume_here(engine) -> None:
        try:
            resume_every_rank(engine, dirname=dirname, resume=resume, open_directory=lambda: CheckpointDirectory(dirname, read_only=True))
        except RankAgreementError as exc:
            seen.update(error=str(exc), failures=sorted(exc.failures))
        engine.terminate()

    trainer.run(_loader(), max_epochs=1)
    return {**seen, "model_untouched": _params(model) == before, "step": trainer.state.optimizer_steps}


def _worker(local_rank: int, tmp: str, single_process_checkpoint: str) -> None:
    rank = idist.get_rank()
    shared = os.path.join(tmp, "shared")
    result: dict = {}

    model, trainer = _trainer(rank)
    CheckpointRotation(shared, every_steps=2, keep_last=2).attach(trainer)
    trainer.run(_loader(), max_epochs=1)
    result["stream_after_save"] = torch.rand(3).tolist()

    torch.manual_seed(1234)  # a different stream: the resume must restore this rank's own
    model, trainer = _trainer(rank)
    rotation = CheckpointRotation(shared, every_steps=2, keep_last=2, resume="auto")
    rotation.attach(trainer)
    trainer.run(_loader(), max_epochs=1)
    result["resumed"] = {"from": os.path.basename(rotation.resumed_from), "step": trainer.state.optimizer_steps}
    result["stream_after_resume"] = torch.rand(3).tolist()

    chosen = os.path.join(shared, sorted(n for n in os.listdir(shared) if n.endswith(".ekpt"))[-1])
    model, trainer = _trainer(rank, out_features=2 if rank == 0 else 3)
    result["misfit_on_rank1"] = _resume_outcome(trainer, model, shared, chosen)

    stale = os.path.join(tmp, f"view-of-rank{rank}")
    os.makedirs(stale, exist_ok=True)
    model, trainer = _trainer(rank)
    directory = shared if rank == 0 else stale
    result["missing_on_rank1"] = _resume_outcome(trainer, model, directory, "auto")

    model, trainer = _trainer(rank)
    result["world_size_1_to_2"] = _resume_outcome(trainer, model, shared, single_process_checkpoint)
    model, trainer = _trainer(rank)
    CheckpointRotation(os.path.join(tmp, "uneven"), every_steps=2).attach(trainer)
    try:
        trainer.run([(torch.randn(2, 4), torch.randn(2, 2))] * (4 - rank), max_epochs=1)  # 4 batches vs 3
    except Exception as exc:  # the refusal, wrapped by the engine as a HandlerError
        result["uneven"] = {"error": str(exc), "step": trainer.state.optimizer_steps}
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("resume_agreement")
    model, trainer = _trainer(0)
    CheckpointRotation(tmp / "one-process", keep_last=1).attach(trainer)
    trainer.run(_loader(), max_epochs=1)
    written = str(next((tmp / "one-process").glob("*.ekpt")))
    spawn_two(_worker, str(tmp), written)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def test_every_rank_resumes_the_same_checkpoint_with_its_own_random_stream(seen):
    assert seen[0]["resumed"] == seen[1]["resumed"]
    assert seen[0]["resumed"]["step"] == 4  # 4 batches per rank, accumulation 1
    for r in seen:
        assert r["stream_after_resume"] == r["stream_after_save"]
    assert seen[0]["stream_after_save"] != seen[1]["stream_after_save"], "the ranks' streams differ"


def test_a_checkpoint_that_does_not_fit_one_rank_is_refused_on_every_rank_before_anything_is_applied(seen):
    for r in seen:
        outcome = r["misfit_on_rank1"]
        assert outcome["failures"] == [1] and "check the checkpoint" in outcome["error"]
        assert "model" in outcome["error"] and outcome["model_untouched"] and outcome["step"] == 0


def test_a_rank_that_lacks_the_chosen_file_stops_every_rank_instead_of_resuming_elsewhere(seen):
    for r in seen:
        outcome = r["missing_on_rank1"]
        assert outcome["failures"] == [1] and "that rank 0 chose" in outcome["error"]
        assert outcome["model_untouched"] and outcome["step"] == 0
    assert seen[0]["missing_on_rank1"]["error"] == seen[1]["missing_on_rank1"]["error"]


def test_a_checkpoint_of_another_world_size_is_refused_naming_it(seen):
    for r in seen:
        outcome = r["world_size_1_to_2"]
        assert outcome["failures"] == [0, 1] and "world size" in outcome["error"]
        assert outcome["model_untouched"] and outcome["step"] == 0


def test_ranks_with_different_numbers_of_batches_are_stopped_at_start_instead_of_hanging(seen):
    for r in seen:
        assert "rank 0: 4, rank 1: 3" in r["uneven"]["error"] and "batches per epoch" in r["uneven"]["error"]
        assert r["uneven"]["step"] == 0
