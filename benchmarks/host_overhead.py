"""Host overhead per iteration: a raw PyTorch loop vs ignite vs engine_kit.

The model is ``nn.Linear(8, 1)`` on batches of 8 on the CPU, so the kernels
cost almost nothing and what is measured is the Python/dispatcher path around
them: the loop, event firing, handlers. Five variants run the same step on the
same pre-built batches:

- ``raw``: a hand-written loop (forward, loss, backward, step, zero_grad).
- ``ignite``: bare ``ignite.engine.Engine`` with that loop body as process function.
- ``engine_kit``: ``engine_kit.create_trainer`` alone.
- ``stack``: the trainer with ``handlers.attach_standard`` (validation every
  epoch on a 2-batch set, TensorBoard, grad norms, step log, NaN guard,
  checkpoint handler attached) but no checkpoint writes.
- ``stack+ckpt``: the same with "last" checkpoints every ``--ckpt-every``
  optimizer steps, a best-1 checkpoint and epoch-end saves (``attach_standard``'s defaults).

Every variant runs with accumulation 1 and 4. Repeats are interleaved (for
each repeat, every variant once, starting at a rotating variant) so load from
other processes hits all variants alike; the table gives the median over
repeats of the time of a whole ``--iters``-iteration run divided by
``--iters``, and its ratio to the raw loop. Building engines and handlers is
not timed; everything inside ``run`` (validation, flushes, saves) is.

Run from the repository root::

    python benchmarks/host_overhead.py                 # the full measurement (~80 s on 2 cores)
    python benchmarks/host_overhead.py --smoke         # a few seconds, numbers meaningless
    python benchmarks/host_overhead.py --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from ignite.engine import Engine
from ignite.metrics import MeanSquaredError

from engine_kit import create_evaluator, create_trainer
from handlers import attach_standard

from _env import describe, environment

VARIANTS = ("raw", "ignite", "engine_kit", "stack", "stack+ckpt")
ACCUMULATIONS = (1, 4)
FEATURES, BATCH = 8, 8

Runner = Callable[[], dict[str, Any]]


def make_data(n_batches: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` seeded ``(x, y)`` regression batches of ``BATCH`` samples."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, FEATURES, generator=gen), torch.randn(BATCH, 1, generator=gen)) for _ in range(n_batches)]


def make_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A fresh seeded model and SGD optimizer, identical for every variant."""
    torch.manual_seed(0)
    model = torch.nn.Linear(FEATURES, 1)
    return model, torch.optim.SGD(model.parameters(), lr=1e-3)


def build_raw(data: list, epochs: int, accum: int, workdir: Path) -> Runner:
    """The hand-written loop every other variant is compared against."""
    model, optimizer = make_model()
    loss_fn = torch.nn.functional.mse_loss

    def run() -> dict[str, Any]:
        model.train()
        for _ in range(epochs):
            for i, (x, y) in enumerate(data, start=1):
                loss = loss_fn(model(x), y)
                (loss / accum if accum > 1 else loss).backward()
                if i % accum == 0 or i == len(data):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        return {}

    return run


def build_ignite(data: list, epochs: int, accum: int, workdir: Path) -> Runner:
    """Bare ignite: the raw loop body as the process function, no handlers."""
    model, optimizer = make_model()
    loss_fn = torch.nn.functional.mse_loss
    epoch_length = len(data)

    def step(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        loss = loss_fn(model(x), y)
        (loss / accum if accum > 1 else loss).backward()
        position = (engine.state.iteration - 1) % epoch_length + 1
        if position % accum == 0 or position == epoch_length:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    engine = Engine(step)

    def run() -> dict[str, Any]:
        model.train()
        engine.run(data, max_epochs=epochs)
        return {}

    return run


def build_engine_kit(data: list, epochs: int, accum: int, workdir: Path) -> Runner:
    """``create_trainer`` with no handler attached."""
    model, optimizer = make_model()
    trainer = create_trainer(model, optimizer, torch.nn.functional.mse_loss, accumulation_steps=accum)

    def run() -> dict[str, Any]:
        state = trainer.run(data, max_epochs=epochs)
        return {"optimizer_steps": state.optimizer_steps}

    return run


def _build_stack(data: list, epochs: int, accum: int, workdir: Path, ckpt_every: int | None) -> Runner:
    model, optimizer = make_model()
    trainer = create_trainer(model, optimizer, torch.nn.functional.mse_loss, accumulation_steps=accum)
    evaluator = create_evaluator(model, metrics={"mse": MeanSquaredError()})
    val = make_data(2, seed=99)
    writes = ckpt_every is not None
    stack = attach_standard(
        trainer, evaluator, val, run_dir=workdir, metric="mse", mode="min",
        checkpoint_every_steps=ckpt_every, keep_last=2, keep_best=1 if writes else 0, resume=None,
    )
    if not writes:
        # attach_standard always saves at epoch end; switching that off keeps the
        # checkpoint handler's per-iteration checks in the timing but no file writes.
        stack.checkpoints.at_epoch_end = False

    def run() -> dict[str, Any]:
        state = trainer.run(data, max_epochs=epochs)
        return {"optimizer_steps": state.optimizer_steps, "checkpoints": state.checkpoints_saved,
                "validations": state.validations}

    return run


def build_stack(data: list, epochs: int, accum: int, workdir: Path) -> Runner:
    """The standard handler stack with every checkpoint write switched off."""
    return _build_stack(data, epochs, accum, workdir, None)


def make_build_stack_ckpt(ckpt_every: int) -> Callable[[list, int, int, Path], Runner]:
    """The standard stack saving every ``ckpt_every`` optimizer steps, best-1 and at epoch end."""

    def build(data: list, epochs: int, accum: int, workdir: Path) -> Runner:
        return _build_stack(data, epochs, accum, workdir, ckpt_every)

    return build


def measure(iters: int, repeats: int, epoch_length: int, ckpt_every: int) -> list[dict[str, Any]]:
    """Interleaved timings; one result row per (accumulation, variant)."""
    builders = {
        "raw": build_raw,
        "ignite": build_ignite,
        "engine_kit": build_engine_kit,
        "stack": build_stack,
        "stack+ckpt": make_build_stack_ckpt(ckpt_every),
    }
    data = make_data(epoch_length, seed=1)
    epochs = iters // epoch_length
    samples: dict[tuple[int, str], list[float]] = {(a, v): [] for a in ACCUMULATIONS for v in VARIANTS}
    info: dict[tuple[int, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ek-bench-host-") as root:
        counter = 0

        def one(variant: str, accum: int, run_epochs: int) -> tuple[float, dict[str, Any]]:
            nonlocal counter
            counter += 1
            workdir = Path(root) / f"{counter:05d}-{variant}"
            runner = builders[variant](data, run_epochs, accum, workdir)
            gc.collect()
            start = time.perf_counter()
            extra = runner()
            elapsed = time.perf_counter() - start
            shutil.rmtree(workdir, ignore_errors=True)
            return elapsed, extra

        # Warm-up: first calls pay for lazy imports, allocator growth and autograd setup.
        for accum in ACCUMULATIONS:
            for variant in VARIANTS:
                one(variant, accum, 1)
        for r in range(repeats):
            for accum in ACCUMULATIONS:
                shift = (r + accum) % len(VARIANTS)
                for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                    elapsed, extra = one(variant, accum, epochs)
                    samples[(accum, variant)].append(elapsed / (epochs * epoch_length) * 1e6)
                    info[(accum, variant)] = extra
    rows = []
    for accum in ACCUMULATIONS:
        raw = statistics.median(samples[(accum, "raw")])
        bare = statistics.median(samples[(accum, "ignite")])
        for variant in VARIANTS:
            values = samples[(accum, variant)]
            median = statistics.median(values)
            rows.append({
                "variant": variant, "accumulation": accum, "median_us": median,
                "min_us": min(values), "max_us": max(values), "ratio_raw": median / raw,
                "ratio_ignite": median / bare, "over_raw_us": median - raw, "samples_us": values,
                "per_run": info.get((accum, variant), {}),
            })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    lines = [
        "| variant | accum | µs/iter (median) | min–max | × raw | × ignite | + µs vs raw | saves/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        saves = row["per_run"].get("checkpoints", "")
        lines.append(
            f"| {row['variant']} | {row['accumulation']} | {row['median_us']:.1f} | "
            f"{row['min_us']:.1f}–{row['max_us']:.1f} | {row['ratio_raw']:.3f} | {row['ratio_ignite']:.3f} | "
            f"{row['over_raw_us']:+.1f} | {saves} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked; ``--smoke`` overrides the sizes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=3000, help="iterations (micro-batches) per timed run")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats per variant")
    parser.add_argument("--epoch-length", type=int, default=500, help="batches per epoch (validation runs once per epoch)")
    parser.add_argument("--ckpt-every", type=int, default=100, help="optimizer steps between 'last' checkpoints in stack+ckpt")
    parser.add_argument("--smoke", action="store_true", help="tiny run that only checks the script works")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.iters, args.repeats, args.epoch_length, args.ckpt_every = 40, 1, 20, 5
    for name in ("iters", "repeats", "epoch_length", "ckpt_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.iters % args.epoch_length or args.epoch_length % max(ACCUMULATIONS):
        parser.error("--iters must be a multiple of --epoch-length, itself a multiple of 4")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure, print the markdown table(s), optionally write the JSON; returns the exit status."""
    args = parse_args(argv)
    rows = measure(args.iters, args.repeats, args.epoch_length, args.ckpt_every)
    env = environment(torch.device("cpu"))
    print(f"host overhead per iteration: nn.Linear({FEATURES}, 1), batch {BATCH}, SGD, CPU; "
          f"{args.iters} iterations per run ({args.iters // args.epoch_length} epochs of {args.epoch_length}), "
          f"{args.repeats} interleaved repeats; stack+ckpt saves every {args.ckpt_every} optimizer steps")
    print(describe(env))
    print()
    print(table(rows))
    if args.json is not None:
        config = {key: getattr(args, key) for key in ("iters", "repeats", "epoch_length", "ckpt_every", "smoke")}
        args.json.write_text(json.dumps({"environment": env, "config": config, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
