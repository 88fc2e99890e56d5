"""What every handler shares: checked options, attach once, state that round-trips with checked keys."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ignite.engine import Engine

from engine_kit.checks import check_int
from engine_kit.errors import fix_message
from engine_kit.events import StepEvents


def check_positive_int(name: str, value: Any, example: int) -> int:
    """``value`` as an int, or a TypeError/ValueError in the house style.

    >>> check_positive_int("flush_every", 50, 50)
    50
    >>> check_positive_int("flush_every", 0, 50)
    Traceback (most recent call last):
    ...
    ValueError: flush_every=0 is below 1. To fix: pass an integer >= 1, e.g. 50.
    """
    return check_int(name, value, minimum=1, example=example)


def require_step_events(engine: Engine, owner: str, *, subject: str = "it") -> None:
    """Refuse an engine without ``StepEvents``: attached to it, ``owner`` would silently do nothing.

    ``subject`` names what the fix tells the user to attach ("it": the handler).

    >>> require_step_events(Engine(lambda e, b: None), "StepLog")
    Traceback (most recent call last):
    ...
    RuntimeError: StepLog needs an engine that fires StepEvents.OPTIMIZER_STEP_COMPLETED, but this Engine has no \
StepEvents (is it an evaluator?). To fix: attach it to the trainer that engine_kit.create_trainer(...) returned.
    """
    if not engine.has_registered_events(StepEvents.OPTIMIZER_STEP_COMPLETED):
        raise RuntimeError(
            fix_message(
                f"{owner} needs an engine that fires StepEvents.OPTIMIZER_STEP_COMPLETED, "
                f"but this {type(engine).__name__} has no StepEvents (is it an evaluator?).",
                f"attach {subject} to the trainer that engine_kit.create_trainer(...) returned.",
            )
        )


def check_state_keys(
    owner: str, expected: Iterable[str], state_dict: Mapping[str, Any], *, source: str | None = None
) -> None:
    """Refuse a ``state_dict`` whose keys are not exactly ``expected``, naming both differences.

    ``source`` names the call whose result to pass instead (default ``"<owner>.state_dict()"``).

    >>> check_state_keys("Counter", ("count",), {"count": 3})
    >>> check_state_keys("Counter", ("count",), {"cuont": 3})
    Traceback (most recent call last):
    ...
    ValueError: Counter.load_state_dict got missing keys ['count'] and unexpected keys ['cuont']. \
To fix: pass the dict that Counter.state_dict() returned.
    """
    expected = tuple(expected)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ValueError(
            fix_message(
                f"{owner}.load_state_dict got missing keys {missing} and unexpected keys {unexpected}.",
                f"pass the dict that {source or f'{owner}.state_dict()'} returned.",
            )
        )


class Handler:
    """Base class of engine_kit handlers.

    A handler has keyword-only options checked in ``__init__``, an
    ``attach(engine, ...)`` that registers it, ``__call__(engine)`` doing the
    work, and ``state_dict()``/``load_state_dict()`` so checkpoints carry it.
    Subclasses list the attributes that make up their state in ``state_keys``.

    >>> class Counter(Handler):
    ...     state_keys = ("count",)
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.count = 0
    >>> c = Counter(); c.load_state_dict({"count": 3}); c.state_dict()
    {'count': 3}
    """

    state_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._attached_to: list[int] = []

    def _claim(self, engine: Engine) -> None:
        """Refuse a second attach to the same engine (it would double-count)."""
        if id(engine) in self._attached_to:
            raise RuntimeError(
                fix_message(
                    f"{type(self).__name__} is already attached to this engine.",
                    "attach each handler once; build a second instance for a second engine.",
                )
            )
        self._attached_to.append(id(engine))

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.state_keys}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        check_state_keys(type(self).__name__, self.state_keys, state_dict)
        for key in self.state_keys:
            setattr(self, key, state_dict[key])
