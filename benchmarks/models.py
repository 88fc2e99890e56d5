"""The benchmark models, their synthetic data and the recipe every runner follows.

Four models cover the range from host-bound to compute-bound:

- ``mlp``: a tiny MLP whose kernels cost microseconds, so the time per
  iteration is the loop's own host work (what a launch-bound GPU model waits on).
- ``cnn``: the lab's CNN (``examples/fashion_mnist.py``) on 1×28×28 at batch 32.
- ``resnet18``: torchvision's ResNet-18 (10 classes) on 3×32×32 at batch 128.
- ``gpt``: a small causal transformer (d=512, 8 layers, 8 heads, context 256,
  vocabulary 8192) at batch 16.

``--smoke`` shrinks every size so a whole run takes seconds.

>>> case = build_case("mlp", torch.device("cpu"), "fp32", smoke=True)
>>> len(case.train), case.epochs, case.optimizer_steps
(4, 2, 2)
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
MODELS = ("mlp", "cnn", "resnet18", "gpt")
ACCUMULATION = 4
MAX_GRAD_NORM = 1.0

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """How long one timed run is and how often the ``_full`` runners do their extra work.

    Attributes:
        batch: micro-batch size.
        iterations: micro-batches per epoch (a multiple of the accumulation).
        epochs: epochs per timed run (validation after each).
        val_batches: batches of the validation set.
        checkpoint_every: optimizer steps between two checkpoints (divides the
            optimizer steps of an epoch, so no runner owes an extra epoch-end save).
        log_every: optimizer steps between two reads of the logged losses.
    """

    batch: int
    iterations: int
    epochs: int
    val_batches: int
    checkpoint_every: int
    log_every: int


# (full size, --smoke size). CPU and CUDA runs use the same sizes; on the CPU
# only the host-bound models are in the default list (the others take minutes per run).
SCHEDULES: dict[str, tuple[Schedule, Schedule]] = {
    "mlp": (Schedule(16, 400, 3, 4, 50, 25), Schedule(16, 4, 2, 1, 1, 1)),
    # Saves as the lab does (every min(100, optimizer steps per epoch // 2) steps): twice an epoch.
    "cnn": (Schedule(32, 64, 3, 4, 8, 8), Schedule(8, 4, 2, 1, 1, 1)),
    # One epoch and one save per run: their checkpoints are 134 MB and 400 MB, and gpu_checks.sh has 8 minutes.
    "resnet18": (Schedule(128, 64, 1, 2, 16, 4), Schedule(4, 4, 2, 1, 1, 1)),
    "gpt": (Schedule(16, 48, 1, 2, 12, 4), Schedule(2, 4, 2, 1, 1, 1)),
}


class TinyGPT(torch.nn.Module):
    """A causal transformer language model: token + position embeddings, pre-norm blocks, a linear head.

    >>> TinyGPT(vocab=32, context=8, width=16, layers=1, heads=2)(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 32])
    """

    def __init__(self, *, vocab: int, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, width)
        self.positions = torch.nn.Parameter(torch.zeros(context, width))
        block = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        h = self.tokens(idx) + self.positions[:length]
        return self.head(self.blocks(h, mask=self.mask[:length, :length], is_causal=True))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over every position."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def lab_cnn() -> torch.nn.Module:
    """The lab's CNN, imported from ``examples/fashion_mnist.py`` so both stay the same model."""
    spec = importlib.util.spec_from_file_location("_lab_example", REPO / "examples" / "fashion_mnist.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.make_model()


def resnet(smoke: bool) -> torch.nn.Module:
    """torchvision's ResNet-18 with a 10-class head (one block per stage instead of two in ``--smoke``)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1] if smoke else [2, 2, 2, 2], num_classes=10)


@dataclass
class ModelSpec:
    """How to build a model and draw one synthetic ``(x, y)`` batch for it."""

    build: Callable[[], torch.nn.Module]
    draw: Callable[[torch.Generator, int], Batch]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    lr: float = 3e-3


def model_spec(name: str, smoke: bool) -> ModelSpec:
    """The model ``name`` (one of ``MODELS``), at smoke size when asked."""
    if name == "mlp":
        return ModelSpec(
            lambda: torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)),
            lambda gen, n: (torch.randn(n, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)),
        )
    if name == "cnn":
        return ModelSpec(
            lab_cnn, lambda gen, n: (torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen))
        )
    if name == "resnet18":
        side = 8 if smoke else 32
        return ModelSpec(
            lambda: resnet(smoke),
            lambda gen, n: (torch.randn(n, 3, side, side, generator=gen), torch.randint(0, 10, (n,), generator=gen)),
            lr=1e-3,
        )
    if name == "gpt":
        vocab, context, width, layers, heads = (256, 32, 64, 2, 4) if smoke else (8192, 256, 512, 8, 8)

        def draw(gen: torch.Generator, n: int) -> Batch:
            tokens = torch.randint(0, vocab, (n, context + 1), generator=gen)
            return tokens[:, :-1], tokens[:, 1:]

        return ModelSpec(
            lambda: TinyGPT(vocab=vocab, context=context, width=width, layers=layers, heads=heads), draw, lm_loss, 3e-4
        )
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


@dataclass
class Case:
    """One model at one precision on one device, with its data already on the device.

    Every runner builds a fresh model from ``spec.build`` under the same seed
    and trains on exactly these batches.
    """

    name: str
    spec: ModelSpec
    device: torch.device
    precision: str
    schedule: Schedule
    train: list[Batch] = field(repr=False)
    val: list[Batch] = field(repr=False)

    @property
    def epochs(self) -> int:
        """Epochs per timed run."""
        return self.schedule.epochs

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps per timed run (every window holds ``ACCUMULATION`` micro-batches)."""
        return self.schedule.epochs * self.schedule.iterations // ACCUMULATION

    @property
    def iterations(self) -> int:
        """Micro-batches per timed run."""
        return self.schedule.epochs * self.schedule.iterations

    def fresh_model(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The model (seeded, on the device, in train mode) and its AdamW optimizer."""
        torch.manual_seed(0)
        model = self.spec.build().to(self.device)
        return model, torch.optim.AdamW(model.parameters(), lr=self.spec.lr)

    def one_cycle(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.OneCycleLR:
        """OneCycleLR over every optimizer step of a run."""
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.spec.lr, total_steps=self.optimizer_steps)


def build_case(name: str, device: torch.device, precision: str, smoke: bool) -> Case:
    """Model ``name``'s case: its schedule and seeded train and validation batches on ``device``."""
    spec = model_spec(name, smoke)
    schedule = SCHEDULES[name][1 if smoke else 0]
    gen = torch.Generator().manual_seed(1)
    train = [spec.draw(gen, schedule.batch) for _ in range(schedule.iterations)]
    val = [spec.draw(gen, schedule.batch) for _ in range(schedule.val_batches)]
    return Case(name, spec, device, precision, schedule, _to(train, device), _to(val, device))


def _to(batches: list[Batch], device: torch.device) -> list[Batch]:
    return [(x.to(device), y.to(device)) for x, y in batches]


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (None for fp32).

    >>> autocast_dtype("bf16"), autocast_dtype("fp32")
    (torch.bfloat16, None)
    """
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def describe_models(smoke: bool) -> dict[str, Any]:
    """Each model's schedule, for the JSON's config section."""
    return {name: vars(SCHEDULES[name][1 if smoke else 0]) for name in MODELS}
