"""Importing Lightning without letting its import change the environment of everything else in the process.

Lightning's import writes process-wide environment variables. One of them,
``PYTORCH_NVML_BASED_CUDA_CHECK=1``, makes every ``torch.cuda.is_available()``
ask NVML, ~36 µs a call on a machine without a GPU; torch calls it every
optimizer step, so a small CPU loop became ~20 % slower in every runner once
Lightning was imported (``lightning_environ.py`` measures it; ``checkpoint_save.py``'s Lightning row imports it this way too). Its users pay
that, the others' do not: ``import_lightning`` puts the environment back after
the import, and ``in_lightning_environ`` gives it back to Lightning's own code
(``run.py``'s Lightning runners) while it runs.
"""

from __future__ import annotations

import os
from typing import Any, Callable

# What importing Lightning wrote into os.environ (name -> value; None: removed), once imported.
_LIGHTNING_ENVIRON: dict[str, str | None] | None = None


def import_lightning() -> Any:
    """``import lightning``, with ``os.environ`` as it was before the import (what it set is remembered)."""
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
