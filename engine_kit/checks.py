"""Argument checks shared by the trainer, the evaluator, the loader and the handlers.

Each returns the checked value (normalised) or raises ``TypeError`` for a
wrong type and ``ValueError`` for a wrong value, with a message that shows the
value and says "To fix: ...".
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable
from typing import Any

from engine_kit.errors import fix_message


def check_int(name: str, value: Any, *, minimum: int, example: int | None = None) -> int:
    """``value`` as an int ``>= minimum``; bools are refused (``True`` is not a count).

    >>> check_int("every_steps", 10, minimum=1)
    10
    >>> check_int("every_steps", 1.5, minimum=1)
    Traceback (most recent call last):
    ...
    TypeError: every_steps=1.5 is not an integer. To fix: pass an integer >= 1.
    """
    hint = f"pass an integer >= {minimum}" + (f", e.g. {example}." if example is not None else ".")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(fix_message(f"{name}={value!r} is not an integer.", hint))
    if value < minimum:
        raise ValueError(fix_message(f"{name}={value} is below {minimum}.", hint))
    return int(value)


def check_optional_int(name: str, value: Any, *, minimum: int) -> int | None:
    """``None`` or ``check_int(name, value, minimum=minimum)``.

    >>> check_optional_int("max_iters", None, minimum=1) is None
    True
    """
    return None if value is None else check_int(name, value, minimum=minimum)


def check_real(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    hint: str,
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``).

    NaN and infinities are always refused; ``hint`` is the "To fix" advice.

    >>> check_real("min_delta", 0.5, low=0.0, hint="pass a small number >= 0.")
    0.5
    >>> check_real("min_delta", float("nan"), low=0.0, hint="pass a small number >= 0.")
    Traceback (most recent call last):
    ...
    ValueError: min_delta=nan is not a finite number in [0.0, inf). To fix: pass a small number >= 0.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(fix_message(f"{name}={value!r} is not a number.", hint))
    value = float(value)
    above_low = value > low if low_open else value >= low
    if not (math.isfinite(value) and above_low and value <= high):
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if math.isfinite(high) else ')'}"
        raise ValueError(fix_message(f"{name}={value} is not a finite number in {interval}.", hint))
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a real ``bool`` (``"yes"`` or ``1`` are refused: they hide typos).

    >>> check_bool("non_blocking", True)
    True
    """
    if not isinstance(value, bool):
        raise TypeError(fix_message(f"{name}={value!r} is not a bool.", f"pass {name}=True or {name}=False."))
    return value


def check_callable(name: str, value: Any, usage: str, *, optional: bool = True) -> Any:
    """``value`` if callable (or ``None`` when ``optional``); ``usage`` shows the expected signature.

    >>> check_callable("batch_size_fn", None, "batch_size_fn(x, y) -> int") is None
    True
    """
    if (value is None and optional) or callable(value):
        return value
    raise TypeError(fix_message(f"{name} is a {type(value).__name__}, not a callable.", f"pass {usage}."))


def check_name(name: str, value: Any, example: str) -> str:
    """A non-empty ``str``.

    >>> check_name("metric", "accuracy", "accuracy")
    'accuracy'
    """
    if not isinstance(value, str):
        raise TypeError(fix_message(f"{name}={value!r} is not a string.", f"pass a name, e.g. {name}={example!r}."))
    if not value:
        raise ValueError(fix_message(f"{name} is an empty string.", f"pass a name, e.g. {name}={example!r}."))
    return value


def check_path(name: str, value: Any, example: str) -> str:
    """``value`` as a ``str`` path (``str`` or ``os.PathLike``).

    >>> check_path("run_dir", "runs/a", "runs/exp1")
    'runs/a'
    """
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError(fix_message(f"{name}={value!r} is not a path.", f"pass a path such as {example!r}."))
    return os.fspath(value)


def check_run_arguments(data: Any, max_epochs: Any, max_iters: Any, epoch_length: Any) -> None:
    """Refuse what ``Engine.run`` would accept silently or reject obscurely.

    ``max_epochs`` 0, -1 or 1.5 would run nothing or a surprising number of
    epochs; data that is not iterable or is empty fails deep inside ignite.

    >>> check_run_arguments([1, 2], 2, None, None)
    >>> check_run_arguments([1, 2], 1.5, None, None)
    Traceback (most recent call last):
    ...
    TypeError: max_epochs=1.5 is not an integer. To fix: pass an integer >= 1.
    """
    check_optional_int("max_epochs", max_epochs, minimum=1)
    check_optional_int("max_iters", max_iters, minimum=1)
    check_optional_int("epoch_length", epoch_length, minimum=1)
    if max_epochs is not None and max_iters is not None:
        raise ValueError(
            fix_message(
                f"max_epochs={max_epochs} and max_iters={max_iters} were both given.",
                "pass one of them: max_epochs counts epochs, max_iters counts micro-batches.",
            )
        )
    if data is None:
        return
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise TypeError(
            fix_message(
                f"data is a {type(data).__name__}, not an iterable of batches.",
                "pass a DataLoader, ResumableLoader or a list of (x, y) batches.",
            )
        )
    try:
        size = len(data)  # type: ignore[arg-type]
    except TypeError:  # no length: an iterator or an iterable dataset
        return
    if size == 0 and epoch_length is None:
        raise ValueError(
            fix_message(
                f"data is an empty {type(data).__name__}: there is nothing to train on.",
                "check the dataset and batch size (drop_last=True with fewer samples than a batch gives 0 batches).",
            )
        )


def check_log_file(name: str, path: Any) -> str:
    """A path a logger can append to, checked before the run: its directory exists and is
    writable, and the path is not a directory or other non-file, nor a name too long.

    Raises ``RunDirectoryError`` (an ``OSError``) naming the path, with "To fix".

    >>> import os, tempfile
    >>> check_log_file("path", os.path.join(tempfile.mkdtemp(), "steps.jsonl")).endswith("steps.jsonl")
    True
    """
    # Imported here: the run-directory checks pull in the filesystem helpers only when a logger is built.
    from engine_kit.errors import RunDirectoryError
    from engine_kit.run_directory import prepare_run_directory

    path = check_path(name, path, "runs/exp1/steps.jsonl")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) and not os.path.lexists(directory):
        raise ValueError(
            fix_message(
                f"the directory of {name}={path!r} does not exist.",
                f"create it first: os.makedirs({directory!r}, exist_ok=True).",
            )
        )
    prepare_run_directory(directory)  # a file in the way, unwritable, too long: typed error naming it
    base = os.path.basename(path)
    try:
        longest = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    if not base or len(os.fsencode(base)) > longest:
        raise RunDirectoryError(
            fix_message(
                f"{name}={path!r}: the file name is empty or longer than the filesystem's {longest} bytes.",
                "pass a shorter file name.",
            )
        )
    if os.path.lexists(path) and not os.path.isfile(path):
        raise RunDirectoryError(
            fix_message(f"{name}={path!r} exists and is not a regular file.", "pass another path, or move that away.")
        )
    return path
