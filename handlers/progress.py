"""ProgressBar: ignite's tqdm bar showing loss and learning rate, read every N iterations."""

from __future__ import annotations

from typing import Any, Mapping

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as IgniteProgressBar

from engine_kit.errors import fix_message
from handlers.base import Handler, check_positive_int
from handlers.step_window import fetch, learning_rates


class ProgressBar(Handler):
    """A tqdm progress bar per epoch (ignite's), with the loss and learning rate as postfix.

    The bar advances every iteration, which costs no host sync and no device
    op. The postfix shows ``loss``, the mean micro-batch loss of the last
    ``every`` iterations (their loss tensors are kept and read together), and
    ``lr`` (param group 0 of the trainer's optimizer); it is updated every
    ``every`` iterations with a single host transfer. On an evaluator (outputs without a loss) the bar only
    advances. Only rank 0 shows a bar.

    Args:
        every: iterations between two postfix updates (and host reads).
        persist: keep the finished bar of each epoch on screen.
        **tqdm_kwargs: passed to ``tqdm`` (``desc``, ``file``, ``disable``, ``ncols``...).

    >>> import io, torch
    >>> from engine_kit import create_trainer
    >>> model = torch.nn.Linear(2, 1)
    >>> trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          torch.nn.functional.mse_loss)
    >>> bar = ProgressBar(every=2, file=io.StringIO())
    >>> bar.attach(trainer)
    >>> _ = trainer.run([(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(5)], max_epochs=1)
    >>> bar.reads, sorted(bar.postfix)
    (2, ['loss', 'lr'])
    """

    def __init__(self, *, every: int = 10, persist: bool = False, **tqdm_kwargs: Any) -> None:
        super().__init__()
        self.every = check_positive_int("every", every, 10)
        if not isinstance(persist, bool):
            raise TypeError(fix_message(f"persist={persist!r} is not a bool.", "pass persist=True or persist=False."))
        self.persist = persist
        self.tqdm_kwargs = tqdm_kwargs
        self.bar: IgniteProgressBar | None = None
        self.postfix: dict[str, float] = {}
        self._losses: list[torch.Tensor] = []
        self._reads = 0

    def attach(self, engine: Engine) -> None:
        """Show a bar for ``engine`` (a trainer or an evaluator)."""
        self._claim(engine)
        kwargs = dict(self.tqdm_kwargs)
        if idist.get_rank() != 0:
            kwargs["disable"] = True
        self.bar = IgniteProgressBar(persist=self.persist, **kwargs)
        # No output_transform: ignite would call .item() on the loss every iteration.
        self.bar.attach(engine)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Keep this iteration's loss (no device op); every ``every`` iterations, read and show the mean."""
        loss = getattr(engine.state.output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())
        if engine.state.iteration % self.every != 0:
            return
        losses, self._losses = self._losses, []
        # One transfer for the losses (and a learning rate kept in a device tensor).
        values = fetch([*losses, *learning_rates(engine)[:1]])
        mean = sum(values[: len(losses)]) / len(losses) if losses else None
        shown = zip(("loss", "lr"), [mean, *values[len(losses):]])
        postfix = {name: value for name, value in shown if value is not None}
        if mean is not None:
            self._reads += 1
        self.postfix = postfix
        pbar = self.bar.pbar if self.bar is not None else None
        if pbar is not None and postfix:
            pbar.set_postfix(postfix, refresh=False)  # drawn with the next bar update

    @property
    def reads(self) -> int:
        """Host reads of the loss made so far (one per postfix update)."""
        return self._reads

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
