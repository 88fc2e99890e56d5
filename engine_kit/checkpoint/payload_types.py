"""The save-time check that a payload holds only types a checkpoint may load.

Loading refuses any pickle that names a global outside a short allow-list
of tensor and container types (:mod:`engine_kit.checkpoint.safety`). Rather
than scanning the pickle that ``torch.save`` just produced — a pure-Python
walk over every opcode, the dearest part of a small save — the payload
itself is walked *before* serialization: its types are exactly the ones
whose pickle stays inside that allow-list, so a payload that could not be
loaded back fails now, naming the offending key, not at resume time.

>>> import torch
>>> check_payload_types({"w": torch.ones(2), "meta": {"step": 3, "lr": [1e-3]}})
>>> check_payload_types({"meta": {"rng": object()}})
Traceback (most recent call last):
...
TypeError: payload['meta']['rng'] is of type object, which a checkpoint cannot load back safely. To fix: store only tensors, numbers, strings, bytes, None, torch.Size/dtype/device and dicts/lists/tuples/sets of them (convert numpy arrays with torch.from_numpy).
"""

from __future__ import annotations

import collections
from typing import Any

import torch

from engine_kit.errors import fix_message

# Leaves whose pickle uses no global, or one on the load-side allow-list.
_LEAF_TYPES = frozenset({str, bytes, bytearray, int, float, complex, bool, type(None), torch.Size, torch.device, torch.dtype})
_MAPPING_TYPES = frozenset({dict, collections.OrderedDict, collections.Counter})
_SEQUENCE_TYPES = frozenset({list, tuple, set})  # not frozenset: torch's weights_only loader refuses it
# Plain and Parameter tensors rebuild through torch._utils' allowed helpers.
_TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})

_FIX = (
    "store only tensors, numbers, strings, bytes, None, torch.Size/dtype/device and dicts/lists/tuples/sets "
    "of them (convert numpy arrays with torch.from_numpy)."
)


def _tensor_problem(tensor: torch.Tensor) -> str | None:
    """Why a tensor of an allowed class still could not be loaded back (None: it can)."""
    if tensor.layout != torch.strided:
        return f"a {tensor.layout} tensor (only dense tensors load back)"
    if tensor.is_quantized:
        return "a quantized tensor"
    if tensor.device.type == "meta":
        return "a meta tensor (it has no data)"
    if getattr(tensor, "__dict__", None):
        return f"a tensor carrying Python attributes {sorted(vars(tensor))}"
    return None


def _all_loadable(payload: dict[str, Any], tensors: list[torch.Tensor] | None = None) -> bool:
    """Whether everything in ``payload`` can be loaded back: the walk of every save, building no key path.

    ``tensors``, when given, receives every tensor met on the way.
    """
    seen: set[int] = set()
    stack: list[Any] = [payload]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind in _LEAF_TYPES:
            continue
        if kind in _TENSOR_TYPES:
            if _tensor_problem(value) is not None:
                return False
            if tensors is not None:
                tensors.append(value)
        elif kind in _MAPPING_TYPES or kind in _SEQUENCE_TYPES:
            if id(value) not in seen:
                seen.add(id(value))
                stack.extend(value)  # a mapping's keys, or a sequence's items
                if kind in _MAPPING_TYPES:
                    stack.extend(value.values())
        else:
            return False
    return True


def loadable_tensors(payload: dict[str, Any]) -> list[torch.Tensor] | None:
    """Every tensor in ``payload`` (once per occurrence), or None when something in it could not be loaded back.

    >>> [t.tolist() for t in loadable_tensors({"w": torch.ones(1), "opt": [torch.zeros(2), 3]})]
    [[0.0, 0.0], [1.0]]
    >>> loadable_tensors({"w": object()}) is None
    True
    """
    tensors: list[torch.Tensor] = []
    return tensors if _all_loadable(payload, tensors) else None


def check_payload_types(payload: dict[str, Any]) -> None:
    """Raise if anything in ``payload`` could not be loaded back from a checkpoint.

    The walk is iterative (no recursion limit) and visits each container
    once, so shared or self-referencing containers are fine.

    Args:
        payload: the dict about to be saved.

    Raises:
        TypeError: a value of another type (a numpy array, a custom class, a
            namedtuple, a sparse tensor...), naming its key path.
    """
    if _all_loadable(payload):
        return
    seen: set[int] = set()  # found one: walk again, naming key paths this time
    stack: list[tuple[str, Any]] = [("payload", payload)]
    while stack:
        where, value = stack.pop()
        kind = type(value)
        if kind in _LEAF_TYPES:
            continue
        if kind in _TENSOR_TYPES:
            problem = _tensor_problem(value)
            if problem is None:
                continue
        elif kind in _MAPPING_TYPES or kind in _SEQUENCE_TYPES:
            if id(value) in seen:
                continue
            seen.add(id(value))
            if kind in _MAPPING_TYPES:
                for key, item in value.items():
                    stack.append((f"{where} key {key!r}", key))
                    stack.append((f"{where}[{key!r}]", item))
            else:
                stack.extend((f"{where}[{index}]", item) for index, item in enumerate(value))
            continue
        else:
            module = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
            problem = f"of type {module}{kind.__qualname__}"
        raise TypeError(fix_message(f"{where} is {problem}, which a checkpoint cannot load back safely.", _FIX))
