"""An ignite ``Engine`` that names failing handlers and never lets a cleanup error hide the real one."""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable, Generator

from ignite.engine import Engine, Events, State

from engine_kit.errors import HandlerError
from engine_kit.iteration_loop import run_epoch


def describe_handler(handler: Callable) -> str:
    """A readable name for ``handler``: ``Class.method``, the function's qualified name, or its class.

    >>> describe_handler(len), describe_handler(describe_handler)
    ('len', 'describe_handler')
    """
    owner = getattr(handler, "__self__", None)
    if owner is not None and not inspect.ismodule(owner):
        return f"{type(owner).__name__}.{getattr(handler, '__name__', 'handler')}"
    name = getattr(handler, "__qualname__", None) or getattr(handler, "__name__", None)
    return name or type(handler).__name__


def _user_handler(handler: Callable) -> Callable:
    # ignite wraps filtered handlers (every=, once=) and keeps the user's one behind _parent.
    parent = getattr(handler, "_parent", None)
    resolved = parent() if parent is not None else None
    return resolved if resolved is not None else handler


def cleanup_handler(handler: Callable) -> Callable:
    """Mark an ``EXCEPTION_RAISED`` handler as cleanup only: it never decides the error's fate.

    ignite ends a run quietly when an ``EXCEPTION_RAISED`` handler returns
    without re-raising. A handler that only flushes or closes something (a log
    writer, the evaluator's mode restore) must not swallow the error by merely
    being attached: marked handlers run, and the error is re-raised unless an
    unmarked handler handled it.

    >>> @cleanup_handler
    ... def close_files(engine, error): ...
    >>> close_files._engine_kit_cleanup
    True
    """
    handler._engine_kit_cleanup = True  # type: ignore[attr-defined]
    return handler


def fire_if_handled(engine: Engine, event: Any) -> None:
    """Fire a registered ``event`` only when a handler listens: the hot path's cheap ``fire_event``.

    ``Engine.fire_event`` re-validates the event (a linear scan) and formats a
    debug message on every call; the step fires up to five events per
    iteration, most of them usually without handlers.
    """
    if engine._event_handlers.get(event):
        engine._fire_event(event)


class GuardedEngine(Engine):
    """ignite ``Engine`` that names failing handlers; otherwise it behaves as ignite documents.

    * An exception raised inside a handler surfaces as ``HandlerError`` naming
      the handler and the event (the original is its ``__cause__``). The
      handler lists (``_event_handlers``, ``RemovableEventHandle.handler``)
      hold the user's own callables, as in ignite.
    * ``EXCEPTION_RAISED`` works as in ignite: handlers get the error; the run
      ends quietly unless one of them re-raises it. Handlers marked with
      ``cleanup_handler`` (engine_kit's log writers) run but never swallow the
      error. The handlers run once per error (ignite runs them a second time
      when the error leaves the epoch loop).
    * The first error wins: when an ``EXCEPTION_RAISED`` handler itself fails,
      the original error is raised with that failure attached as a note
      (``add_note``) and the remaining handlers still run. A handler that
      re-raises the error, or translates it on purpose (``raise X from e``),
      is not a failure: what it raises propagates, as in ignite.
    * After a run that raised, the next ``run()`` resumes from the failed
      iteration (ignite 0.5.5 would return ``None`` without running).
    * Its epoch loop (``engine_kit.iteration_loop``) does what ignite's does,
      event for event, but skips dispatching events that have no handler.

    >>> engine = GuardedEngine(lambda engine, batch: batch)
    >>> engine.run([1, 2], max_epochs=1).output
    2
    """

    def _assert_allowed_event(self, event_name: Any) -> None:
        # ignite names the class in this message; to the user this is ignite's Engine.
        if event_name not in self._allowed_events:
            self.logger.error(f"attempt to add event handler to an invalid event {event_name}")
            raise ValueError(f"Event {event_name} is not a valid event for this Engine.")

    def _fire_event(self, event_name: Any, *event_args: Any, **event_kwargs: Any) -> None:
        # ignite's loop, with each call guarded; no per-call debug formatting.
        self.last_event_name = event_name
        for func, args, kwargs in self._event_handlers[event_name]:
            if event_kwargs:
                kwargs.update(event_kwargs)  # kept for later calls, as ignite does
            # Most handlers take the engine alone: call them without building argument tuples.
            engine_only = len(args) == 1 and not kwargs and not event_args and type(args[0]) is weakref.ref
            if engine_only:
                engine = args[0]()
                if engine is None:
                    raise RuntimeError("Engine reference not resolved. Cannot execute event handler.")
            else:
                first, others = _split_engine(args)
            try:
                if engine_only:
                    func(engine)
                else:
                    func(*first, *(event_args + others), **kwargs)
            except HandlerError:
                raise
            except Exception as err:
                if event_name == Events.EXCEPTION_RAISED:
                    raise
                raise _handler_error(func, event_name, err) from err

    def _run_once_on_dataset_as_gen(self) -> Generator[State, None, float]:
        return run_epoch(self, GuardedEngine._fire_event)

    def _internal_run(self) -> Any:
        # ignite 0.5.5 keeps the generator an exception finished, so the next run()
        # returns None without running: drop it, and the next run() resumes.
        try:
            return super()._internal_run()
        except BaseException:
            self._internal_run_generator = None
            raise

    def _handle_exception(self, e: BaseException) -> None:
        if getattr(e, "_engine_kit_handled", False):
            raise e  # the epoch loop handled it already; it is now leaving the run loop
        _mark_handled(e)
        entries = list(self._event_handlers.get(Events.EXCEPTION_RAISED, ()))
        handled = False
        for func, args, kwargs in entries:
            user = _user_handler(func)
            handled = handled or not getattr(user, "_engine_kit_cleanup", False)
            first, others = _split_engine(args)
            try:
                func(*first, e, *others, **kwargs)
            except BaseException as failure:  # noqa: BLE001 - any failure here is reported on `e`
                if failure is e or failure.__cause__ is e:
                    _mark_handled(failure)
                    raise  # re-raised, or translated on purpose (`raise X from e`): not a handler failure
                if isinstance(e, Exception) and not isinstance(failure, Exception):
                    raise  # a KeyboardInterrupt/SystemExit while cleaning up must still stop the process
                _add_note(
                    e,
                    f"While handling it, the EXCEPTION_RAISED handler {describe_handler(user)} failed: "
                    f"{type(failure).__name__}: {failure}",
                )
        if not handled:
            raise e


def _split_engine(args: tuple) -> tuple[tuple, tuple]:
    # ignite stores a weak reference to the engine as the first argument of handlers that take it.
    if args and isinstance(args[0], weakref.ref):
        engine = args[0]()
        if engine is None:
            raise RuntimeError("Engine reference not resolved. Cannot execute event handler.")
        return (engine,), args[1:]
    return (), args


def _mark_handled(error: BaseException) -> None:
    # ignite hands an error to _handle_exception twice (epoch loop, run loop): once is enough.
    try:
        error._engine_kit_handled = True  # type: ignore[attr-defined]
    except AttributeError:  # exceptions with __slots__ cannot be tagged
        pass


def _add_note(error: BaseException, note: str) -> None:
    try:
        error.add_note(note)
    except AttributeError:  # Python 3.10: no add_note, keep the note where 3.11 would
        error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]


def _handler_error(func: Callable, event_name: Any, err: Exception) -> HandlerError:
    name = describe_handler(_user_handler(func))
    event = getattr(event_name, "name", str(event_name))
    return HandlerError(
        f"handler {name} failed on event {event}: {type(err).__name__}: {err}",
        handler_name=name,
        event=event,
    )
