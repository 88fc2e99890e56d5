"""Refuse pickles that carry code, before ``torch.load`` ever sees them.

``torch.load(weights_only=True)`` is the first line of defense and we always
pass it explicitly. This module is the second, independent of torch's
switches: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns weights-only loading
off for callers that leave ``weights_only`` unset (torch 2.14 keeps an
explicit ``True``, older or patched builds might not), so we do not rely on
it alone. :func:`scan_pickle` walks the opcodes of ``data.pkl`` with
:mod:`pickletools` (which never executes anything) and accepts only the
globals that ``torch.save`` emits for dicts/lists of tensors, numbers and
strings: the tensor rebuild helpers, storages, dtypes, ``torch.Size``,
``torch.device``, ``OrderedDict``, ``set``/``frozenset``/``complex`` and
``_codecs.encode`` (how protocol 2 spells ``bytes``). Anything else, like
``builtins.open`` or ``posix.system``, is refused.

>>> import pickle
>>> scan_pickle(pickle.dumps({"lr": 0.1}, protocol=2))
>>> scan_pickle(pickle.dumps(print, protocol=2))
Traceback (most recent call last):
...
ValueError: the pickle references builtins.print, which is not on the allow-list of tensor/container types
"""

from __future__ import annotations

import os
import pickletools
from collections.abc import Iterator
from typing import Any

import torch

_ALLOWED_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("collections", "Counter"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch.storage", "UntypedStorage"),
        ("torch", "Size"),
        ("torch", "device"),
    }
)

# The legacy typed storages torch.save names in each tensor's persistent id.
_STORAGE_NAMES = frozenset(
    f"{kind}Storage"
    for kind in (
        "Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char",
        "Byte", "Bool", "ComplexFloat", "ComplexDouble",
    )
)

# Protocol 2 writes Python 3's ``builtins`` as ``__builtin__``.
_MODULE_ALIASES = {"__builtin__": "builtins", "exceptions": "builtins"}

_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"})
_MEMO_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_MEMO_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_FORBIDDEN_OPS = frozenset({"EXT1", "EXT2", "EXT4"})

_TRUE_VALUES = ("1", "y", "yes", "true")


def is_allowed_global(module: str, name: str) -> bool:
    """Whether ``module.name`` may appear in a checkpoint's pickle.

    >>> is_allowed_global("torch._utils", "_rebuild_tensor_v2"), is_allowed_global("posix", "system")
    (True, False)
    """
    module = _MODULE_ALIASES.get(module, module)
    if (module, name) in _ALLOWED_GLOBALS:
        return True
    if module != "torch":
        return False
    # vars() instead of getattr: torch's module __getattr__ would import
    # lazy submodules for an attacker-chosen name.
    return name in _STORAGE_NAMES or isinstance(vars(torch).get(name), torch.dtype)


def _refuse(module: str, name: str) -> ValueError:
    return ValueError(
        f"the pickle references {_MODULE_ALIASES.get(module, module)}.{name}, "
        "which is not on the allow-list of tensor/container types"
    )


def _opcodes(data: bytes) -> Iterator[tuple[pickletools.OpcodeInfo, Any, int | None]]:
    """pickletools.genops, with its assorted errors on garbage as one ValueError."""
    try:
        yield from pickletools.genops(data)
    except Exception as exc:
        raise ValueError(f"the pickle does not parse: {exc}") from exc


def scan_pickle(data: bytes) -> None:
    """Check every global a pickle would import, without executing it.

    Args:
        data: the pickle bytes (``data.pkl`` of a ``torch.save`` archive).

    Raises:
        ValueError: one-line reason: a global outside the allow-list, an
            opcode that can resolve code we cannot see (``EXT*``, a
            ``STACK_GLOBAL`` whose names are not plain strings), or a pickle
            that does not parse.
    """
    memo: dict[int, str] = {}
    recent: list[str | None] = []  # values pushed by the last string/memo-get opcodes
    memo_counter = 0
    for opcode, arg, _pos in _opcodes(data):
        op = opcode.name
        if op in _FORBIDDEN_OPS:
            raise ValueError(f"the pickle uses the extension registry opcode {op}")
        if op in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            if not is_allowed_global(module, name):
                raise _refuse(module, name)
        elif op == "STACK_GLOBAL":
            if len(recent) < 2 or recent[-1] is None or recent[-2] is None:
                raise ValueError("the pickle builds a global from computed names (STACK_GLOBAL)")
            if not is_allowed_global(recent[-2], recent[-1]):
                raise _refuse(recent[-2], recent[-1])
        if op in _STRING_OPS:
            recent.append(arg if isinstance(arg, str) else None)
        elif op in _MEMO_GET_OPS:
            recent.append(memo.get(arg))
        elif op == "FRAME":
            continue  # framing only; the stack is unchanged
        elif op in _MEMO_PUT_OPS:
            # A put keeps the stack as is; remember the string it names.
            index = memo_counter if op == "MEMOIZE" else arg
            memo_counter += op == "MEMOIZE"
            if recent and recent[-1] is not None:
                memo[index] = recent[-1]
            else:
                memo.pop(index, None)
            continue
        else:
            recent.clear()


def weights_only_env_conflict() -> str | None:
    """Describe an environment that would make torch.load fail or go unsafe.

    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is harmless to us (we pass
    ``weights_only=True`` explicitly and pre-scan), but together with
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` torch raises a bare RuntimeError.

    Returns:
        A one-line problem statement, or ``None`` when loading can go ahead.
    """
    force_safe = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in _TRUE_VALUES
    force_unsafe = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in _TRUE_VALUES
    if force_safe and force_unsafe:
        return "both TORCH_FORCE_WEIGHTS_ONLY_LOAD and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD are set"
    return None
