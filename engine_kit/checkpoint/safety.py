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

import io
import os
import pickletools
from collections.abc import Iterator
from typing import IO, Any

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


# The memo model keeps exact track of which indexes were put (a bitmap), but
# remembers the string values of at most this many short strings; a
# STACK_GLOBAL built from a string it did not remember is refused, so the
# bound can only cause a refusal, never let a global through.
_MAX_MEMO_INDEX = 1 << 27
_MAX_REMEMBERED_STRINGS = 100_000
_MAX_REMEMBERED_LENGTH = 256


class PickleMemo:
    """The unpickler's memo, modelled exactly as :mod:`pickle` (and torch's loader) keep it.

    ``PUT``/``BINPUT``/``LONG_BINPUT`` store at their argument, ``MEMOIZE``
    at ``len(memo)`` (the number of *distinct* indexes stored so far, not the
    number of ``MEMOIZE`` ops), a second put at an index replaces its value,
    and a ``GET`` of an index never put is an error. Only string values are
    tracked (everything else is "unknown"), in bounded memory.

    >>> memo = PickleMemo()
    >>> memo.put(5, "torch"); memo.put(memo.next_index(), "os")
    >>> memo.next_index(), memo.get(1)
    (2, 'os')
    >>> memo.get(3)
    Traceback (most recent call last):
    ...
    ValueError: the pickle reads memo index 3, which was never stored
    """

    def __init__(self) -> None:
        self._present = bytearray()
        self._count = 0
        self._strings: dict[int, str] = {}

    def next_index(self) -> int:
        """Where ``MEMOIZE`` stores: the number of distinct indexes stored."""
        return self._count

    def _is_present(self, index: int) -> bool:
        byte = index >> 3
        return 0 <= index and byte < len(self._present) and bool(self._present[byte] & (1 << (index & 7)))

    def put(self, index: int, value: str | None) -> None:
        """Store ``value`` (None: not a plain string) at ``index``."""
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"the pickle stores at memo index {index!r} (negative)")
        if index >= _MAX_MEMO_INDEX:
            raise ValueError(f"the pickle stores at memo index {index}, beyond the {_MAX_MEMO_INDEX} a checkpoint can need")
        if not self._is_present(index):
            byte = index >> 3
            if byte >= len(self._present):
                self._present.extend(bytes(byte + 1 - len(self._present)))
            self._present[byte] |= 1 << (index & 7)
            self._count += 1
        # A redefinition must forget the old string, whatever replaces it.
        self._strings.pop(index, None)
        if value is not None and len(value) <= _MAX_REMEMBERED_LENGTH and len(self._strings) < _MAX_REMEMBERED_STRINGS:
            self._strings[index] = value

    def get(self, index: int) -> str | None:
        """The string at ``index`` (None: not a string, or not remembered); ValueError if never stored."""
        if not isinstance(index, int) or not self._is_present(index):
            raise ValueError(f"the pickle reads memo index {index!r}, which was never stored")
        return self._strings.get(index)


def _opcodes(stream: IO[bytes]) -> Iterator[tuple[pickletools.OpcodeInfo, Any, int | None]]:
    """pickletools.genops, with its assorted errors on garbage as one ValueError."""
    try:
        yield from pickletools.genops(stream)
    except Exception as exc:
        raise ValueError(f"the pickle does not parse: {exc}") from exc


def scan_pickle(data: bytes) -> None:
    """Check every global a pickle would import, without executing it.

    Args:
        data: the pickle bytes (``data.pkl`` of a ``torch.save`` archive).

    Raises:
        ValueError: one-line reason: a global outside the allow-list, an
            opcode that can resolve code we cannot see (``EXT*``, a
            ``STACK_GLOBAL`` whose names are not plain strings), a memo
            read of an index never stored, or a pickle that does not parse.
    """
    scan_pickle_stream(io.BytesIO(data))


def scan_pickle_stream(stream: IO[bytes]) -> None:
    """:func:`scan_pickle` on a readable stream, in memory bounded by the largest opcode argument.

    The scan tracks only what can name a global: the strings on top of the
    stack (the last two pushed, as ``STACK_GLOBAL`` takes them) and the
    memo (see :class:`PickleMemo`). Any other opcode forgets the stack top,
    so a name that passed through anything but a plain push or memo read is
    refused rather than guessed.

    Raises:
        ValueError: as :func:`scan_pickle`.
    """
    memo = PickleMemo()
    top: list[str | None] = []  # what the last string pushes / memo reads left on the stack
    for opcode, arg, _pos in _opcodes(stream):
        op = opcode.name
        if op in _FORBIDDEN_OPS:
            raise ValueError(f"the pickle uses the extension registry opcode {op}")
        if op in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            if not is_allowed_global(module, name):
                raise _refuse(module, name)
        elif op == "STACK_GLOBAL":
            if len(top) < 2 or top[-1] is None or top[-2] is None:
                raise ValueError("the pickle builds a global from computed names (STACK_GLOBAL)")
            if not is_allowed_global(top[-2], top[-1]):
                raise _refuse(top[-2], top[-1])
        if op in _STRING_OPS:
            top = [*top[-1:], arg if isinstance(arg, str) else None]
        elif op in _MEMO_GET_OPS:
            top = [*top[-1:], memo.get(arg)]
        elif op == "FRAME":
            continue  # framing only; the stack is unchanged
        elif op in _MEMO_PUT_OPS:
            # A put leaves the stack as is and stores its top, a string or not.
            memo.put(memo.next_index() if op == "MEMOIZE" else arg, top[-1] if top else None)
        else:
            top = []


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
