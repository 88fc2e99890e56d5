"""What every handler shares: attach once, state that round-trips with checked keys."""

from __future__ import annotations

from typing import Any, Mapping

from ignite.engine import Engine

from engine_kit.errors import fix_message


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
        missing = [k for k in self.state_keys if k not in state_dict]
        unexpected = [k for k in state_dict if k not in self.state_keys]
        if missing or unexpected:
            raise ValueError(
                fix_message(
                    f"{type(self).__name__}.load_state_dict got missing keys {missing} "
                    f"and unexpected keys {unexpected}.",
                    f"pass the dict that {type(self).__name__}.state_dict() returned.",
                )
            )
        for key in self.state_keys:
            setattr(self, key, state_dict[key])
