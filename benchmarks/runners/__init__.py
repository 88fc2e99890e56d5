"""The runners: one training recipe, written for each framework.

A runner builder takes a ``Case`` and a fresh work directory and returns a
``run()`` closure; everything it builds (model, optimizer, engines,
handlers) is built before the clock starts, and ``run()`` trains
``case.epochs`` epochs on ``case.train`` and returns facts about the run
(optimizer steps, checkpoints written) for the record.

Each framework has a plain runner (the training step alone: accumulation 4,
clipping at 1.0 where the framework has it, the case's precision) and a
``_full`` one (plus OneCycleLR per optimizer step, validation each epoch, a
checkpoint every ``checkpoint_every`` optimizer steps, the loss logged every
``log_every`` steps).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

from lightning_env import in_lightning_environ
from models import Case

from runners.engine_kit_runner import build_engine_kit
from runners.ignite_runner import build_ignite
from runners.raw import build_raw

Run = Callable[[], dict[str, Any]]
Builder = Callable[[Case, Any, bool], Run]

RUNNERS = ("raw", "raw_full", "engine_kit", "engine_kit_full", "ignite", "ignite_full", "lightning", "lightning_full")


def lightning_available() -> bool:
    """Whether Lightning is installed (``pip install -e '.[bench]'``); its runners are skipped otherwise."""
    return importlib.util.find_spec("lightning") is not None


def builder(runner: str) -> Callable[[Case, Any], Run]:
    """The builder of ``runner`` (one of ``RUNNERS``), with its ``full`` flag bound."""
    base, _, suffix = runner.partition("_full")
    full = runner.endswith("_full")
    if base == "raw":
        build: Builder = build_raw
    elif base == "engine_kit":
        build = build_engine_kit
    elif base == "ignite":
        build = build_ignite
    elif base == "lightning":
        def build(case: Case, workdir: Any, full: bool) -> Run:
            # Imported only when installed and asked for; built and run with Lightning's environment.
            from runners.lightning_runner import build_lightning

            run = in_lightning_environ(lambda: build_lightning(case, workdir, full))
            return lambda: in_lightning_environ(run)
    else:
        raise ValueError(f"unknown runner {runner!r}; choose from {', '.join(RUNNERS)}")
    return lambda case, workdir: build(case, workdir, full)


def reference(runner: str) -> str:
    """The runner that ``runner``'s ratio is taken against: ``raw``, or ``raw_full`` for ``_full`` runners.

    >>> reference("ignite_full"), reference("engine_kit")
    ('raw_full', 'raw')
    """
    return "raw_full" if runner.endswith("_full") else "raw"
