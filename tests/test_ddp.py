"""DDP and FSDP2 through ignite.distributed: no_sync on non-final micro-batches, same result as one process (acceptance 6)."""

from __future__ import annotations

import json

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from engine_kit import StepEvents, create_trainer
from tests.distributed.spawn import spawn_two
from tests.helpers import mlp

ACCUMULATION = 4
N_BATCHES = 8  # two windows per epoch


def combined_batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 2, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(N_BATCHES)]


def _worker(local_rank, out_dir):
    rank, world = idist.get_rank(), idist.get_world_size()
    model = idist.auto_model(mlp(in_features=2, out=1))
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    all_reduces = []

    def counting_allreduce(state, bucket):
        all_reduces.append(bucket.index())
        return default_hooks.allreduce_hook(None, bucket)

    model.register_comm_hook(state=None, hook=counting_allreduce)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, opt, F.mse_loss, accumulation_steps=ACCUMULATION, max_grad_norm=10.0)
    backwards = []
    trainer.add_event_handler(StepEvents.BACKWARD_COMPLETED, lambda: backwards.append(len(all_reduces)))
    shards = [(x[rank::world], y[rank::world]) for x, y in combined_batches()]
    trainer.run(shards, max_epochs=1)
    params = [p.detach().tolist() for p in model.module.parameters()]
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"params": params, "all_reduces_after_backward": backwards,
                   "steps": trainer.state.optimizer_steps}, f)


def test_two_gloo_processes_match_one_process_on_the_combined_batch(tmp_path):
    spawn_two(_worker, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    single = mlp(in_features=2, out=1)
    trainer = create_trainer(single, torch.optim.SGD(single.parameters(), lr=0.1), F.mse_loss,
                             accumulation_steps=ACCUMULATION, max_grad_norm=10.0)
    trainer.run(combined_batches(), max_epochs=1)
    expected = [p.detach() for p in single.parameters()]

    for result in results:
        assert result["steps"] == 2
        # One all-reduce (one bucket: the model is tiny) per window, none for the
        # micro-batches that ran under no_sync.
        assert result["all_reduces_after_backward"] == [0, 0, 0, 1, 1, 1, 1, 2]
        for got, want in zip(result["params"], expected):
            assert torch.allclose(torch.tensor(got), want, atol=1e-6)


def _uneven_shards(rank: int) -> list:
    """Rank 0 takes the first ``cut`` samples of each combined batch, rank 1 the rest: uneven on purpose."""
    cuts = [5, 2, 6, 3, 4, 7, 1, 5]
    return [(x[:cut], y[:cut]) if rank == 0 else (x[cut:], y[cut:]) for (x, y), cut in zip(combined_batches(), cuts)]


def _fsdp2_worker(local_rank, out_dir):
    from torch.distributed.fsdp import fully_shard

    rank = idist.get_rank()
    model = mlp(in_features=2, out=1)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, opt, F.mse_loss, accumulation_steps=ACCUMULATION, max_grad_norm=10.0)
    trainer.run(_uneven_shards(rank), max_epochs=1)
    params = [p.full_tensor().detach().tolist() for p in model.parameters()]
    with open(f"{out_dir}/fsdp{rank}.json", "w") as f:
        json.dump({"params": params, "steps": trainer.state.optimizer_steps}, f)


def test_fsdp2_on_uneven_batches_matches_one_process_on_the_combined_batches(tmp_path):
    spawn_two(_fsdp2_worker, str(tmp_path))
    single = mlp(in_features=2, out=1)
    trainer = create_trainer(single, torch.optim.SGD(single.parameters(), lr=0.1), F.mse_loss,
                             accumulation_steps=ACCUMULATION, max_grad_norm=10.0)
    trainer.run(combined_batches(), max_epochs=1)
    for rank in range(2):
        result = json.loads((tmp_path / f"fsdp{rank}.json").read_text())
        assert result["steps"] == 2
        for got, want in zip(result["params"], single.parameters()):
            assert torch.allclose(torch.tensor(got), want.detach(), atol=1e-6, rtol=0)
