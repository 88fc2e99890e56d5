"""Logits or probabilities? What the first batches fed into the loss, against what the loss expects.

``LossProbe`` wraps a loss function for a few calls and records, through a
``TorchFunctionMode``, every call to one of torch's classification losses
inside it (so ``nn.CrossEntropyLoss()``, lambdas and label smoothing are all
seen) with a few statistics of its input, computed on the device. The
statistics are read once, after the last probed call.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from engine_kit.doctor.findings import Finding

# loss function -> (what it expects, whether its input has a class dimension)
EXPECTS: dict[Callable[..., Any], tuple[str, bool]] = {
    F.cross_entropy: ("logits", True),
    F.binary_cross_entropy_with_logits: ("logits", False),
    F.nll_loss: ("log-probabilities", True),
    F.binary_cross_entropy: ("probabilities", False),
}
# Statistics of one input, in this order (rows: along the class dimension).
STATS = ("min", "max", "row_sum_error", "row_logsumexp_error")
TOLERANCE = 1e-3


def input_stats(x: torch.Tensor, has_classes: bool) -> torch.Tensor:
    """``STATS`` of a loss input, as one float tensor on its device (no host read).

    >>> [round(v, 3) for v in input_stats(torch.tensor([[0.25, 0.75]]), True).tolist()]
    [0.25, 0.75, 0.0, 1.224]
    """
    x = x.detach().float()
    if not x.numel():
        return torch.full((4,), float("nan"), device=x.device)
    low, high = torch.aminmax(x)
    if has_classes and x.dim() >= 1:
        dim = 1 if x.dim() >= 2 else 0
        # The infinity norm is the largest absolute value: one op for abs().max().
        row_sum = torch.linalg.vector_norm(x.sum(dim) - 1, float("inf"))
        row_lse = torch.linalg.vector_norm(x.logsumexp(dim), float("inf"))
    else:
        row_sum = row_lse = torch.full((), float("inf"), device=x.device)
    return torch.stack([low, high, row_sum, row_lse])


class _Recorder(TorchFunctionMode):
    def __init__(self, records: list[tuple[str, str, bool, torch.Tensor]]) -> None:
        super().__init__()
        self.records = records

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        expected = EXPECTS.get(func)
        if expected is not None and args and isinstance(args[0], torch.Tensor):
            kind, has_classes = expected
            self.records.append((func.__name__, kind, has_classes, input_stats(args[0], has_classes)))
        return func(*args, **kwargs)


def judge(name: str, kind: str, has_classes: bool, stats: list[float], calls: int) -> Finding | None:
    """The finding for ``calls`` inputs of loss ``name`` whose combined ``STATS`` are ``stats``.

    >>> judge("cross_entropy", "logits", True, [0.0, 1.0, 0.0, 1.2], 3).code
    'probabilities-into-logits-loss'
    >>> judge("cross_entropy", "logits", True, [-2.0, 3.0, 4.0, 3.5], 3) is None
    True
    """
    low, high, row_sum, row_lse = stats
    batches = f"on the first {calls} batches"
    in_unit = low >= 0.0 and high <= 1.0
    if kind == "logits":
        if has_classes and in_unit and row_sum < TOLERANCE:
            return Finding(
                "probabilities-into-logits-loss",
                f"{name} expects logits but got probabilities {batches}: every row sums to 1 "
                f"(within {row_sum:.1e}) and all values lie in [{low:.3g}, {high:.3g}], so softmax runs twice "
                "and the gradients shrink.",
                f"return the raw logits from the model (drop the final softmax) and keep {name}, "
                "or apply softmax only at prediction time.",
            )
        if has_classes and high <= 0.0 and row_lse < TOLERANCE:
            return Finding(
                "probabilities-into-logits-loss",
                f"{name} expects logits but got log-probabilities {batches}: all values are <= 0 (max "
                f"{high:.3g}) and every row's logsumexp is 0 (within {row_lse:.1e}); {name} applies "
                "log_softmax itself.",
                "return the raw logits from the model (drop the final log_softmax), or switch the loss to nll_loss.",
            )
        if not has_classes and in_unit:
            return Finding(
                "probabilities-into-logits-loss",
                f"{name} expects logits but got values all in [{low:.3g}, {high:.3g}] {batches}: "
                "a sigmoid output, so sigmoid runs twice and the loss cannot go below log(1 + e^-1).",
                "return the raw logits from the model (drop the final sigmoid) and keep "
                "binary_cross_entropy_with_logits.",
            )
        return None
    if kind == "log-probabilities" and (high > TOLERANCE or row_lse > TOLERANCE):
        got = "probabilities (rows sum to 1)" if in_unit and row_sum < TOLERANCE else "unnormalized logits"
        return Finding(
            "logits-into-probabilities-loss",
            f"{name} expects log-probabilities but got {got} {batches}: values range over [{low:.3g}, {high:.3g}] "
            f"and rows' logsumexp is {row_lse:.3g} away from 0, so the loss is not a log-likelihood.",
            f"use cross_entropy on the raw logits, or apply log_softmax(dim=1) before {name}.",
        )
    if kind == "probabilities" and not in_unit:
        return Finding(
            "logits-into-probabilities-loss",
            f"{name} expects probabilities in [0, 1] but got values in [{low:.3g}, {high:.3g}] {batches}: "
            "unnormalized logits.",
            "use binary_cross_entropy_with_logits on the raw logits (numerically stable), "
            "or apply sigmoid before binary_cross_entropy.",
        )
    return None


class LossProbe:
    """Wraps ``loss_fn`` for its first ``calls`` calls and judges what they fed the torch losses inside it.

    After the last probed call (or when a probed call raises) ``on_done`` gets
    the findings and the probe hands back ``loss_fn`` via ``restore``.

    >>> found = []
    >>> probe = LossProbe(torch.nn.functional.cross_entropy, 2, found.extend, lambda fn: None)
    >>> for _ in range(2):
    ...     _ = probe(torch.softmax(torch.randn(4, 3), 1), torch.tensor([0, 1, 2, 0]))
    >>> [f.code for f in found]
    ['probabilities-into-logits-loss']
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], calls: int,
                 on_done: Callable[[list[Finding]], None], restore: Callable[[Callable], None]) -> None:
        self.loss_fn = loss_fn
        self.calls = calls
        self.on_done = on_done
        self.restore = restore
        self.records: list[tuple[str, str, bool, torch.Tensor]] = []
        self.seen = 0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.seen += 1
        try:
            with _Recorder(self.records):
                loss = self.loss_fn(*args, **kwargs)
        except Exception:
            self.finish()  # a probability loss given logits may raise: say why before the error surfaces
            raise
        if self.seen >= self.calls:
            self.finish()
        return loss

    def finish(self) -> None:
        """Restore the loss function and report (one host read for every recorded input)."""
        self.restore(self.loss_fn)
        records, self.records = self.records, []
        if not records:
            self.on_done([])
            return
        values = torch.stack([stats.to("cpu") for *_, stats in records]).tolist()  # the single host read
        combined: dict[tuple[str, str, bool], list[Any]] = {}
        for (name, kind, has_classes, _), stats in zip(records, values):
            entry = combined.setdefault((name, kind, has_classes), [stats, 0])
            old = entry[0]
            entry[0] = [min(old[0], stats[0]), max(old[1], stats[1]), max(old[2], stats[2]), max(old[3], stats[3])]
            entry[1] += 1
        findings = [judge(name, kind, has_classes, stats, count)
                    for (name, kind, has_classes), (stats, count) in combined.items()]
        self.on_done([f for f in findings if f is not None])
