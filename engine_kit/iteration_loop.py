"""One epoch of an ignite ``Engine``, without the work nobody observes: ``GuardedEngine``'s inner loop.

ignite 0.5.5's ``Engine._run_once_on_dataset_as_gen`` does, per iteration,
four event dispatches (``GET_BATCH_STARTED``, ``GET_BATCH_COMPLETED``,
``ITERATION_STARTED``, ``ITERATION_COMPLETED``), each followed by a new
``_maybe_terminate_or_interrupt`` generator. On a host-bound model that is a
few percent of the whole step, spent mostly on events without handlers and on
flags that are all down. ``run_epoch`` does the same observable things in the
same order, and skips only what has no observer:

* an event without handlers is not dispatched; ``engine.last_event_name``
  still names it, as after a dispatch (handlers and the loop itself read it);
* the terminate/interrupt generator runs only when one of its flags is up
  (with every flag down it does nothing).

Everything else is ignite's contract, unchanged: ``state.batch`` reset before
each fetch and ``state.output`` reset after it, ``epoch_length`` learnt from
the first exhausted pass of a loader without a length, the loader re-created
once when it runs dry mid-run (with ignite's warning when it cannot provide
the remaining iterations), ``max_iters``, ``terminate()``,
``terminate_epoch()`` (``TERMINATE_SINGLE_EPOCH`` with ``iter_counter``),
``interrupt()`` (the generator yields the state, the next ``run()`` resumes
here), errors handed to ``_handle_exception``, and the epoch's duration as the
return value (``state.times``).

An engine whose class overrides ``_fire_event`` (to record or decorate every
dispatch, as some of ignite's own tests do) gets every event dispatched.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, Generator

from ignite.engine import Engine, Events, State
from ignite.engine.engine import _EngineTerminateException, _EngineTerminateSingleEpochException


# The loop's events, bound once: the hot path reads module globals, not enum attributes.
_GET_BATCH_STARTED = Events.GET_BATCH_STARTED
_GET_BATCH_COMPLETED = Events.GET_BATCH_COMPLETED
_ITERATION_STARTED = Events.ITERATION_STARTED
_ITERATION_COMPLETED = Events.ITERATION_COMPLETED
_DATALOADER_STOP_ITERATION = Events.DATALOADER_STOP_ITERATION


def _fire(engine: Engine, event: Any, dispatch_all: bool) -> bool:
    """Dispatch ``event`` if a handler listens (or ``dispatch_all``), else only record it as the last event.

    Returns whether a terminate/interrupt flag is up: only then has the caller
    ``_maybe_terminate_or_interrupt`` to run (with every flag down it does nothing).
    """
    if dispatch_all or engine._event_handlers.get(event):
        engine._fire_event(event)
    else:
        engine.last_event_name = event
    return engine.should_terminate or engine.should_terminate_single_epoch or engine.should_interrupt


def _warn_data_exhausted(state: State) -> None:
    total = state.epoch_length * state.max_epochs if state.max_epochs is not None else state.max_iters
    warnings.warn(
        "Data iterator can not provide data anymore but required total number of "
        "iterations to run is not reached. "
        f"Current iteration: {state.iteration} vs Total iterations to run : {total}"
    )


def run_epoch(engine: Engine, own_fire_event: Callable) -> Generator[State, None, float]:
    """Run ``engine`` through one epoch (or what is left of it after a resume); return its duration.

    ``own_fire_event`` is the ``_fire_event`` function whose dispatch of an
    empty handler list only sets ``last_event_name``: events are skipped only
    for engines that use it.
    """
    start_time = time.time()
    # A subclass that overrides _fire_event watches every dispatch: skip nothing for it.
    dispatch_all = type(engine)._fire_event is not own_fire_event
    # A resumed run (load_state_dict, interrupt) starts counting from its position in the epoch.
    iter_counter = 0 if engine._init_iter is None else engine._init_iter
    engine._init_iter = None
    retried_loader = False  # the loader was re-created after running dry: once more dry ends the run
    try:
        if engine._dataloader_iter is None:
            raise RuntimeError(
                "Internal error, self._dataloader_iter is None. Please, file an issue if you encounter this error."
            )
        while True:
            state = engine.state
            state.batch = None
            has_loader = state.dataloader is not None  # run(data=None): no batch events at all
            try:
                # After DATALOADER_STOP_ITERATION the re-created loader's first fetch is not announced
                # again. (`!=` on events is a Python __eq__: skipped when the last event is, by
                # identity, the previous iteration's last one.)
                last = engine.last_event_name
                if has_loader and (last is _ITERATION_COMPLETED or last != _DATALOADER_STOP_ITERATION):
                    if _fire(engine, _GET_BATCH_STARTED, dispatch_all):
                        yield from engine._maybe_terminate_or_interrupt()
                state.batch = next(engine._dataloader_iter)
                # Reset on purpose: an iterable loader's last output must not leak into this iteration.
                state.output = None
                if has_loader:
                    if _fire(engine, _GET_BATCH_COMPLETED, dispatch_all):
                        yield from engine._maybe_terminate_or_interrupt()
                iter_counter += 1
                retried_loader = False
            except StopIteration:
                if state.epoch_length is None:
                    # A loader without a length: its first pass defines the epoch.
                    state.epoch_length = iter_counter
                    if state.max_iters is not None:
                        state.max_epochs = math.ceil(state.max_iters / state.epoch_length)
                    break
                if retried_loader:
                    if not engine._is_done(state):
                        _warn_data_exhausted(state)
                    break
                if has_loader:
                    if _fire(engine, _DATALOADER_STOP_ITERATION, dispatch_all):
                        yield from engine._maybe_terminate_or_interrupt()
                engine._setup_dataloader_iter()
                retried_loader = True
                continue

            state.iteration += 1
            if _fire(engine, _ITERATION_STARTED, dispatch_all):
                yield from engine._maybe_terminate_or_interrupt()
            state.output = engine._process_function(engine, state.batch)
            if _fire(engine, _ITERATION_COMPLETED, dispatch_all):
                yield from engine._maybe_terminate_or_interrupt()

            if state.epoch_length is not None and iter_counter == state.epoch_length:
                break
            if state.max_iters is not None and state.iteration == state.max_iters:
                engine.should_terminate = True
                raise _EngineTerminateException()

    except _EngineTerminateSingleEpochException:
        engine._fire_event(Events.TERMINATE_SINGLE_EPOCH, iter_counter=iter_counter)
        engine._setup_dataloader_iter()
    except _EngineTerminateException:
        raise  # the run loop handles it (TERMINATE), not _handle_exception
    except Exception as err:
        engine.logger.error(f"Current run is terminating due to exception: {err}")
        engine._handle_exception(err)

    return time.time() - start_time
