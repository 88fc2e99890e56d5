"""Numeric precision: which autocast context and whether a GradScaler runs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch

from engine_kit.errors import fix_message

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


@dataclass(frozen=True)
class Precision:
    """A resolved precision for one device.

    Attributes:
        name: "fp32", "bf16" or "fp16" (never "auto").
        device_type: "cpu" or "cuda" (the autocast device type).

    >>> p = resolve_precision("auto", torch.device("cpu"))
    >>> p.name, p.uses_scaler
    ('fp32', False)
    """

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def uses_scaler(self) -> bool:
        # Only fp16 has a dynamic range small enough for gradients to underflow.
        return self.name == "fp16"

    def autocast(self) -> ContextManager:
        """The forward-pass context: a real autocast, or a no-op for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is enabled only for fp16 (one code path for all)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.uses_scaler)


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """Check ``precision`` against ``device`` and resolve "auto".

    "auto" is bf16 on a CUDA device that supports it, fp16 (+ GradScaler) on
    other CUDA devices, fp32 elsewhere.
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(
            fix_message(
                f"precision={precision!r} is not one of {PRECISIONS}.",
                "pass precision='fp32', 'bf16', 'fp16' or 'auto'.",
            )
        )
    is_cuda = device.type == "cuda"
    if precision == "auto":
        if is_cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp16" and not is_cuda:
        raise ValueError(
            fix_message(
                f"precision='fp16' needs a CUDA device, but device={str(device)!r}.",
                "use precision='fp32' (or 'bf16') on this device, or device='cuda'.",
            )
        )
    if precision == "bf16" and is_cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(
            fix_message(
                f"precision='bf16' is not supported by {torch.cuda.get_device_name(device)}.",
                "use precision='fp16' (with GradScaler) or 'auto' on this GPU.",
            )
        )
    return Precision(name=precision, device_type="cuda" if is_cuda else "cpu")


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn ``device`` into a ``torch.device``, refusing CUDA where there is none."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            fix_message(f"device={device!r} is not a device ({err}).", "pass 'cpu', 'cuda' or 'cuda:N'.")
        ) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            fix_message(f"device={device!r} but CUDA is not available here.", "pass device='cpu'.")
        )
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved
