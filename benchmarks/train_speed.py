"""End-to-end training speed: engine_kit against a hand-written loop, same step, one run.

The framework promise is "at the speed of a hand-written loop" (≤ 2% cost).
Both sides run the identical AMP step — autocast (bf16/fp16 on CUDA, fp32 on
CPU), GradScaler for fp16, loss / accumulation, unscale, clip at 1.0, step,
update, zero_grad(set_to_none=True) — on the same pre-built device batches:

- ``raw``: the loop written out by hand.
- ``engine_kit``: ``create_trainer`` with the same options.
- ``engine_kit+stack``: the trainer with ``attach_standard`` (TensorBoard, grad
  norms, step log, NaN guard; validation attached but not due and checkpoints
  off: the raw loop does neither, and checkpoint_save.py measures saves).

Models: the lab CNN (two conv blocks + 128-unit head, 28x28 inputs, batch 32 x
accumulation 4) and a small GPT (causal transformer, context 128). Repeats are
interleaved (each repeat runs every variant once, starting at a rotating
variant); the table gives the median time per optimizer step and the ratio to
the raw loop.

    python benchmarks/train_speed.py --device cuda            # the GPU measurement
    python benchmarks/train_speed.py --device cpu --models cnn
    python benchmarks/train_speed.py --smoke                  # seconds, numbers meaningless
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from ignite.metrics import Loss

from engine_kit import create_evaluator, create_trainer, resolve_precision
from handlers import attach_standard

from _env import describe, environment

VARIANTS = ("raw", "engine_kit", "engine_kit+stack")
ACCUMULATION = 4


class TinyGPT(torch.nn.Module):
    """A small causal transformer language model (pre-norm encoder layers with a causal mask)."""

    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, width)
        self.positions = torch.nn.Parameter(torch.zeros(context, width))
        layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tokens(idx) + self.positions[: idx.shape[1]]
        return self.head(self.blocks(h, mask=self.mask[: idx.shape[1], : idx.shape[1]], is_causal=True))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def lab_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 7 * 7, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
    )


def make_case(name: str, device: torch.device, n_batches: int, smoke: bool) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    if name == "cnn":
        batches = [(torch.randn(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen))
                   for _ in range(n_batches)]
        return {"build": lab_cnn, "loss": F.cross_entropy, "batches": [(x.to(device), y.to(device)) for x, y in batches]}
    context, width, layers = (32, 64, 1) if smoke else (128, 256, 4)
    batch = 4 if smoke else 16
    data = torch.randint(0, 256, (n_batches, batch, context + 1), generator=gen)
    batches = [(d[:, :-1].to(device), d[:, 1:].to(device)) for d in data]
    return {"build": lambda: TinyGPT(256, context, width, layers, 4), "loss": lm_loss, "batches": batches}


def raw_runner(case: dict[str, Any], device: torch.device, precision: str) -> Callable[[], int]:
    torch.manual_seed(0)
    model = case["build"]().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    resolved = resolve_precision(precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=resolved.name == "fp16")
    autocast = (lambda: torch.autocast(device.type, dtype=resolved.dtype)) if resolved.dtype else contextlib.nullcontext
    loss_fn, batches = case["loss"], case["batches"]

    def run() -> int:
        model.train()
        steps = 0
        for i, (x, y) in enumerate(batches):
            with autocast():
                loss = loss_fn(model(x), y) / ACCUMULATION
            scaler.scale(loss).backward()
            if (i + 1) % ACCUMULATION == 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                steps += 1
        return steps

    return run


def engine_runner(case: dict[str, Any], device: torch.device, precision: str, stack: bool, run_dir: str) -> Callable[[], int]:
    torch.manual_seed(0)
    model = case["build"]().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    trainer = create_trainer(model, optimizer, case["loss"], device=device, precision=precision,
                             accumulation_steps=ACCUMULATION, max_grad_norm=1.0)
    if stack:
        evaluator = create_evaluator(model, metrics={"loss": Loss(case["loss"])}, device=device, precision=precision)
        # Validation is attached but never due: the raw loop does no evaluation either.
        handlers = attach_standard(trainer, evaluator, case["batches"][:2], run_dir=run_dir, metric="loss", mode="min",
                                   validate_every_epochs=10**9, checkpoint_every_steps=None, keep_best=0, resume=None)
        handlers.checkpoints.at_epoch_end = False  # checkpoint cost is measured by checkpoint_save.py
    batches = case["batches"]

    def run() -> int:
        before = trainer.state.optimizer_steps
        trainer.run(batches, max_epochs=(trainer.state.epoch or 0) + 1)
        return trainer.state.optimizer_steps - before

    return run


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    results: dict[str, Any] = {"environment": environment(device), "rows": []}
    for model_name in args.models:
        case = make_case(model_name, device, args.batches, args.smoke)
        with tempfile.TemporaryDirectory() as tmp:
            runners = {
                "raw": raw_runner(case, device, args.precision),
                "engine_kit": engine_runner(case, device, args.precision, False, tmp),
                "engine_kit+stack": engine_runner(case, device, args.precision, True, tmp),
            }
            for runner in runners.values():  # warm-up: allocator, cuDNN autotuning, first-window bookkeeping
                runner()
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for repeat in range(args.repeats):
                order = VARIANTS[repeat % len(VARIANTS):] + VARIANTS[: repeat % len(VARIANTS)]
                for variant in order:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    steps = runners[variant]()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[variant].append((time.perf_counter() - start) / steps)
        raw = statistics.median(times["raw"])
        for variant in VARIANTS:
            median = statistics.median(times[variant])
            results["rows"].append({"model": model_name, "variant": variant, "ms_per_step": median * 1e3,
                                    "min_ms": min(times[variant]) * 1e3, "max_ms": max(times[variant]) * 1e3,
                                    "ratio_to_raw": median / raw})
    return results


def print_table(results: dict[str, Any]) -> None:
    print(describe(results["environment"]))
    print()
    print("| model | variant | ms / optimizer step (median) | min–max | × raw |")
    print("|---|---|---|---|---|")
    for row in results["rows"]:
        print(f"| {row['model']} | {row['variant']} | {row['ms_per_step']:.3f} | "
              f"{row['min_ms']:.3f}–{row['max_ms']:.3f} | {row['ratio_to_raw']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--models", nargs="+", default=["cnn", "gpt"], choices=("cnn", "gpt"))
    parser.add_argument("--batches", type=int, default=200, help="micro-batches per timed run (a multiple of 4)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.repeats = 8, 2
    results = measure(args)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
