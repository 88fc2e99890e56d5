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
import os
from typing import Any, Callable

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


# What importing Lightning wrote into os.environ (name -> value; None: removed), once imported.
_LIGHTNING_ENVIRON: dict[str, str | None] | None = None


def import_lightning() -> Any:
    """Import Lightning without letting its import change the environment the other runners run in.

    Lightning's import writes process-wide environment variables. One of them,
    ``PYTORCH_NVML_BASED_CUDA_CHECK=1``, makes every ``torch.cuda.is_available()``
    ask NVML, ~36 µs a call on a machine without a GPU; torch calls it every
    optimizer step, so a small CPU loop became ~20 % slower in every runner once
    Lightning was imported. Its users pay that, the others' do not: the
    environment is put back after the import, and ``in_lightning_environ`` gives
    it back to the Lightning runners while they build and run.
    """
    global _LIGHTNING_ENVIRON
    before = dict(os.environ)
    import lightning

    if _LIGHTNING_ENVIRON is None:
        after = dict(os.environ)
        _LIGHTNING_ENVIRON = {name: after.get(name) for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    _apply(before)
    return lightning


def in_lightning_environ(function: Callable[[], Any]) -> Any:
    """Call ``function`` with the environment variables Lightning's import sets, then put the environment back."""
    import_lightning()
    before = dict(os.environ)
    try:
        for name, value in (_LIGHTNING_ENVIRON or {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        return function()
    finally:
        _apply(before)


def _apply(environ: dict[str, str]) -> None:
    """Make os.environ equal ``environ`` (changing only the variables that differ)."""
    for name in [name for name in os.environ if name not in environ]:
        del os.environ[name]
    for name, value in environ.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


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
