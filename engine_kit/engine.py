"""An ignite ``Engine`` that never swallows errors and names failing handlers."""

from __future__ import annotations

import functools
from typing import Any, Callable

from ignite.engine import Engine, EventsList

from engine_kit.errors import HandlerError


def _describe(handler: Callable) -> str:
    owner = getattr(handler, "__self__", None)
    if owner is not None:
        return f"{type(owner).__name__}.{getattr(handler, '__name__', 'handler')}"
    name = getattr(handler, "__qualname__", None) or getattr(handler, "__name__", None)
    return name or type(handler).__name__


class _GuardedHandler:
    """Calls a handler and re-raises its failure naming handler and event.

    Equality with the wrapped handler keeps ignite's ``has_event_handler`` and
    ``remove_event_handler`` working with the user's original callable.
    """

    def __init__(self, handler: Callable, event: Any) -> None:
        self.handler = handler
        self.event = event
        # inspect.signature follows __wrapped__, so ignite's signature check sees the real one.
        self.__wrapped__ = handler
        functools.update_wrapper(self, handler, updated=())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.handler(*args, **kwargs)
        except HandlerError:
            raise
        except Exception as err:
            name = _describe(self.handler)
            event = getattr(self.event, "name", str(self.event))
            raise HandlerError(
                f"handler {name} failed on event {event}: {type(err).__name__}: {err}",
                handler_name=name,
                event=event,
            ) from err

    def __eq__(self, other: object) -> bool:
        return other is self or other == self.handler

    def __hash__(self) -> int:
        return hash(self.handler)


def fire_if_handled(engine: Engine, event: Any) -> None:
    """Fire a registered ``event`` only when a handler listens: the hot path's cheap ``fire_event``.

    ``Engine.fire_event`` re-validates the event (a linear scan) and formats a
    debug message on every call; the step fires up to four events per
    iteration, most of them usually without handlers.
    """
    if engine._event_handlers.get(event):
        engine._fire_event(event)


class GuardedEngine(Engine):
    """ignite ``Engine`` with two guarantees that plain ignite lacks.

    * An exception raised inside a handler surfaces as ``HandlerError`` naming
      the handler and the event (the original is its ``__cause__``).
    * An exception is always re-raised, even when ``EXCEPTION_RAISED`` handlers
      are attached (ignite would hand it to them and swallow it); those
      handlers still run first.

    >>> engine = GuardedEngine(lambda engine, batch: batch)
    >>> engine.run([1, 2], max_epochs=1).output
    2
    """

    def add_event_handler(self, event_name: Any, handler: Callable, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(event_name, EventsList) and not isinstance(handler, _GuardedHandler):
            handler = _GuardedHandler(handler, event_name)
        return super().add_event_handler(event_name, handler, *args, **kwargs)

    def _handle_exception(self, e: BaseException) -> None:
        # ignite handles an exception twice (epoch loop, then run loop): run the
        # EXCEPTION_RAISED handlers once, and always re-raise.
        if not getattr(e, "_engine_kit_handled", False):
            try:
                e._engine_kit_handled = True  # type: ignore[attr-defined]
            except AttributeError:  # exceptions with __slots__ cannot be tagged
                pass
            super()._handle_exception(e)  # raises e itself when no EXCEPTION_RAISED handler exists
        raise e
