"""GuardedEngine's own epoch loop against ignite's: the same events in the same order, the same end state.

ignite's own test suite (``scripts/ignite_conformance.py``) mostly attaches
handlers to every event, where nothing is skipped. These scenarios run
without handlers (every event skipped, only recorded as ``last_event_name``)
and with one handler per event, on ignite's ``Engine`` and on
``GuardedEngine``, recording each event as it becomes ``last_event_name``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest
from ignite.engine import Engine, Events

from engine_kit import GuardedEngine


def _recording(base: type) -> type:
    class Recording(base):  # type: ignore[misc, valid-type]
        """Records every event the loop reaches, dispatched or skipped."""

        @property
        def last_event_name(self) -> Any:
            return self.__dict__.get("_last")

        @last_event_name.setter
        def last_event_name(self, event: Any) -> None:
            self.__dict__["_last"] = event
            if event is not None:
                self.__dict__.setdefault("seen", []).append((self.state.epoch, self.state.iteration, event.name))

    return Recording


def _one_shot() -> Any:
    return iter(range(4))  # no length: the first pass defines the epoch; a second epoch finds it dry


# name -> (process function's extra action, run arguments, data factory)
Action = Callable[[Engine, int], None]


def _terminate_at(n: int) -> Action:
    return lambda engine, batch: engine.terminate() if engine.state.iteration == n else None


def _terminate_epoch_at(n: int) -> Action:
    return lambda engine, batch: engine.terminate_epoch() if engine.state.iteration == n else None


def _interrupt_at(n: int) -> Action:
    return lambda engine, batch: engine.interrupt() if engine.state.iteration == n else None


SCENARIOS: dict[str, tuple[Action | None, dict[str, Any], Callable[[], Any]]] = {
    "two epochs": (None, {"max_epochs": 2}, lambda: list(range(5))),
    "epoch longer than the loader": (None, {"max_epochs": 2, "epoch_length": 5}, lambda: list(range(3))),
    "iterator without length runs dry": (None, {"max_epochs": 2}, _one_shot),
    "no data": (None, {"max_epochs": 2, "epoch_length": 4}, lambda: None),
    "max_iters": (None, {"max_iters": 7}, lambda: list(range(5))),
    "terminate in the step": (_terminate_at(3), {"max_epochs": 2}, lambda: list(range(5))),
    "terminate_epoch in the step": (_terminate_epoch_at(2), {"max_epochs": 2}, lambda: list(range(5))),
    "interrupt then resume": (_interrupt_at(3), {"max_epochs": 2}, lambda: list(range(5))),
}


def _run(base: type, scenario: str, with_handlers: bool) -> dict[str, Any]:
    action, kwargs, make_data = SCENARIOS[scenario]
    batches: list[Any] = []

    def step(engine: Engine, batch: Any) -> Any:
        batches.append(batch)
        if action is not None:
            action(engine, batch)
        return batch

    engine = _recording(base)(step)
    if with_handlers:
        for event in Events:
            if event not in (Events.EXCEPTION_RAISED, Events.TERMINATE_SINGLE_EPOCH):
                engine.add_event_handler(event, lambda: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = engine.run(make_data(), **kwargs)
        if scenario == "interrupt then resume":
            state = engine.run()
    return {
        "events": engine.seen,
        "batches": batches,
        "state": (state.epoch, state.iteration, state.epoch_length, state.max_epochs, state.max_iters, state.output),
        "times": sorted(state.times),
        "warnings": [str(w.message) for w in caught],
    }


@pytest.mark.parametrize("with_handlers", [False, True], ids=["no handlers", "a handler on every event"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_same_events_order_and_state_as_ignite(scenario: str, with_handlers: bool) -> None:
    ours = _run(GuardedEngine, scenario, with_handlers)
    reference = _run(Engine, scenario, with_handlers)
    assert ours == reference
    assert len(ours["events"]) > 4  # the recording saw the run


def test_a_handler_added_mid_epoch_to_an_unobserved_event_runs_from_the_next_iteration() -> None:
    calls: list[int] = []
    engine = GuardedEngine(lambda engine, batch: batch)

    @engine.on(Events.ITERATION_COMPLETED(once=2))
    def add_late(engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, lambda e: calls.append(e.state.iteration))

    engine.run(list(range(5)), max_epochs=1)
    assert calls == [3, 4, 5]


def test_a_subclass_overriding_fire_event_sees_every_event_dispatched() -> None:
    fired: list[str] = []

    class Watching(GuardedEngine):
        def _fire_event(self, event_name: Any, *args: Any, **kwargs: Any) -> None:
            fired.append(event_name.name)
            super()._fire_event(event_name, *args, **kwargs)

    Watching(lambda engine, batch: batch).run([1, 2], max_epochs=1)
    assert fired.count("GET_BATCH_STARTED") == 2 and fired.count("ITERATION_COMPLETED") == 2
