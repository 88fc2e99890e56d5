"""Instructions per micro-batch of the training loop, counted by valgrind: a load-proof host-cost ratio.

On a machine shared with other jobs, CPU and wall times of a host-bound loop
vary by ±10 % between repeats, more than the few percent the loop's own
machinery costs. Instruction counts do not depend on load. This script runs
one epoch of ``run.py``'s ``mlp`` case (Linear(32, 64)-ReLU-Linear(64, 10),
batch 16, AdamW, accumulation 4, clipping at 1.0, fp32, 400 micro-batches)
four ways, each after two warm-up epochs, every measured epoch inside one
``operator.call``:

- ``raw``: the hand-written loop of ``runners/raw.py`` (``raw``).
- ``ignite_bare``: ignite's ``Engine`` running the same hand-written step as
  its process function: ignite's own per-iteration cost.
- ``engine_kit_step``: engine_kit's ``TrainStep`` called in a plain Python
  loop: the step's own cost, without any engine.
- ``engine_kit``: ``create_trainer(...).run``, as the ``engine_kit`` runner.

Under callgrind, collection is on only inside ``operator.call`` and a
profile is dumped after each call, so each dump counts one variant's epoch:

    valgrind --tool=callgrind --collect-atstart=no --toggle-collect=_operator_call \\
        --dump-after=_operator_call --callgrind-out-file=/tmp/loop.%p.out \\
        .venv/bin/python benchmarks/loop_instructions.py
    .venv/bin/python benchmarks/loop_instructions.py --report /tmp/loop.<pid>.out

(``_operator_call`` is CPython 3.11's C function behind ``operator.call``;
importing torch under valgrind takes ~3 minutes, the four epochs ~2.) Run
without valgrind it prints CPU µs per micro-batch instead (load-sensitive).
"""

from __future__ import annotations

import argparse
import operator
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from ignite.engine import Engine

from engine_kit import create_trainer
from models import ACCUMULATION, MAX_GRAD_NORM, Case, build_case

VARIANTS = ("raw", "ignite_bare", "engine_kit_step", "engine_kit")


def _hand_written_step(case: Case) -> tuple[Callable[[int, torch.Tensor, torch.Tensor], None], torch.nn.Module]:
    """``runners/raw.py``'s step in fp32: loss / 4, backward; every 4th: unscale, clip, step, zero."""
    model, optimizer = case.fresh_model()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = torch.amp.GradScaler(case.device.type, enabled=False)
    loss_fn = case.spec.loss_fn

    def step(i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(model(x), y)
        scaler.scale(loss / ACCUMULATION).backward()
        if i % ACCUMULATION == 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        return loss

    return step, model


def build(variant: str, case: Case) -> Callable[[], None]:
    """A closure that trains one epoch of ``case`` the ``variant`` way."""
    data = case.train
    if variant == "raw":
        step, model = _hand_written_step(case)

        def raw_epoch() -> None:
            model.train()
            for i, (x, y) in enumerate(data, start=1):
                step(i, x, y)

        return raw_epoch
    if variant == "ignite_bare":
        step, model = _hand_written_step(case)
        engine = Engine(lambda engine, batch: step(engine.state.iteration, *batch).detach())
        return lambda: engine.run(data, max_epochs=engine.state.epoch + 1)
    model, optimizer = case.fresh_model()
    trainer = create_trainer(model, optimizer, case.spec.loss_fn, device=case.device,
                             accumulation_steps=ACCUMULATION, max_grad_norm=MAX_GRAD_NORM)
    if variant == "engine_kit":
        return lambda: trainer.run(data, max_epochs=trainer.state.epoch + 1)
    state, train_step = trainer.state, trainer.step
    state.epoch_length = len(data)

    def step_epoch() -> None:
        model.train()
        state.iteration = 0
        for batch in data:
            state.iteration += 1
            state.output = train_step(trainer, batch)

    return step_epoch


def report(dump: Path) -> None:
    """Print instructions per micro-batch from the four dumps ``<dump>.1`` … ``<dump>.4``."""
    iterations = len(build_case("mlp", torch.device("cpu"), "fp32", smoke=False).train)
    counts = {}
    for index, variant in enumerate(VARIANTS, start=1):
        text = Path(f"{dump}.{index}").read_text()
        counts[variant] = int(re.search(r"^summary: (\d+)", text, re.MULTILINE).group(1)) / iterations
    print("| variant | instructions per micro-batch | × raw |\n|---|---|---|")
    for variant, count in counts.items():
        print(f"| `{variant}` | {count / 1000:.1f} k | {count / counts['raw']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    """Measure (under callgrind: one dump per variant) or, with ``--report``, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, default=None, help="callgrind output file (without .1 … .4)")
    args = parser.parse_args(argv)
    if args.report is not None:
        report(args.report)
        return 0
    torch.set_num_threads(1)
    case = build_case("mlp", torch.device("cpu"), "fp32", smoke=False)
    epochs = {variant: build(variant, case) for variant in VARIANTS}
    for epoch in epochs.values():  # warm-up: allocator, lazy imports, optimizer state
        epoch()
        epoch()
    for variant, epoch in epochs.items():
        start = time.process_time()
        operator.call(epoch)  # callgrind counts inside this call only, then dumps
        print(f"{variant}: {(time.process_time() - start) / len(case.train) * 1e6:.1f} CPU µs per micro-batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
