"""Multi-process runs (``torchrun``, ``ignite.distributed``) that agree and survive crashes.

- :mod:`~engine_kit.distributed.agreement`: rank 0 decides, every rank gets the
  same value or the same error; checks that ranks agree; barriers with timeouts.
- :mod:`~engine_kit.distributed.rank_state`: each rank's RNG states and data
  position in checkpoints, restored on that rank.
- :mod:`~engine_kit.distributed.shared_dir`: refuse a checkpoint directory
  that is not one shared directory for every rank.
- :mod:`~engine_kit.distributed.resume`: every rank resumes from the
  checkpoint rank 0 chose, or the run stops on every rank.

With one process (or without ``torch.distributed``) every function is a plain
local call.

>>> from engine_kit.distributed import agree, decide, is_multiprocess
>>> is_multiprocess()
False
"""

from engine_kit.distributed.agreement import (
    agree,
    any_rank,
    any_rank_every,
    barrier,
    check_same,
    decide,
    gather,
    is_multiprocess,
    rank,
    world_size,
)
from engine_kit.distributed.rank_state import (
    add_rank_states,
    capture_rank_rng_state,
    gather_rank_states,
    restore_own_rank_state,
    restore_rank_rng_state,
)
from engine_kit.distributed.shared_dir import check_shared_directory

__all__ = [
    "add_rank_states",
    "agree",
    "any_rank",
    "any_rank_every",
    "barrier",
    "capture_rank_rng_state",
    "check_same",
    "check_shared_directory",
    "decide",
    "gather",
    "gather_rank_states",
    "is_multiprocess",
    "rank",
    "restore_own_rank_state",
    "restore_rank_rng_state",
    "world_size",
]
