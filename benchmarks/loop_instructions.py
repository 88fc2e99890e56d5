"""Instructions per micro-batch of the training loop, counted by valgrind: a load-proof host-cost ratio.

On a machine shared with other jobs, CPU and wall times of a host-bound loop
vary by ±10 % between repeats, more than the few percent the loop's own
machinery costs. Instruction counts do not depend on load. This script runs
one epoch of ``run.py``'s ``mlp`` case (Linear(32, 64)-ReLU-Linear(64, 10),
batch 16, AdamW, accumulation 4, clipping at 1.0, fp32, 400 micro-batches)
four ways, each after two warm-up epochs, and one whole run (3 epochs, 1200
micro-batches, 6 saves, 3 validations) of each ``_full`` runner, built by
``runners/`` exactly as ``run.py`` builds it, after one warm-up run; every
measured epoch or run inside one ``operator.call``:

- ``raw``: the hand-written loop of ``runners/raw.py`` (``raw``).
- ``ignite_bare``: ignite's ``Engine`` running the same hand-written step as
  its process function: ignite's own per-iteration cost.
- ``engine_kit_step``: engine_kit's ``TrainStep`` called in a plain Python
  loop: the step's own cost, without any engine.
- ``engine_kit``: ``create_trainer(...).run``, as the ``engine_kit`` runner.
- ``raw_full`` / ``engine_kit_full``: ``run.py``'s runners of those names
  (fresh model and work directory per run, as ``run.py`` does). Counted per
  micro-batch over the whole run, so validation and saves are amortized as in
  ``run.py``'s ratios. Only the training thread counts (callgrind's toggle is
  per thread): work a runner hands to a background thread (TensorBoard's
  writer, an asynchronous save) is not in its count, and waits (fsync) cost
  no instructions.

Under callgrind, collection is on only inside ``operator.call`` and a
profile is dumped after each call, so each dump counts one variant's epoch:

    valgrind --tool=callgrind --collect-atstart=no --toggle-collect=_operator_call \\
        --dump-after=_operator_call --callgrind-out-file=/tmp/loop.%p.out \\
        .venv/bin/python benchmarks/loop_instructions.py
    .venv/bin/python benchmarks/loop_instructions.py --report /tmp/loop.<pid>.out

(``_operator_call`` is CPython 3.11's C function behind ``operator.call``;
importing torch under valgrind takes ~3 minutes, the measured variants ~8.
``--variants raw,engine_kit`` measures a subset; pass the same to ``--report``.
An ablation variant ``engine_kit_full-without-Doctor+NanGuard`` runs ``engine_kit_full`` with
those ``attach_standard`` handlers left out, to see what each costs.) Run
without valgrind it prints CPU µs per micro-batch instead (load-sensitive).
"""

from __future__ import annotations

import argparse
import operator
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from ignite.engine import Engine

from engine_kit import create_trainer
from models import ACCUMULATION, MAX_GRAD_NORM, Case, build_case
from runners import builder

VARIANTS = ("raw", "ignite_bare", "engine_kit_step", "engine_kit", "raw_full", "engine_kit_full")
FULL_VARIANTS = ("raw_full", "engine_kit_full")
# attach_standard's handlers an ablation may leave out: engine_kit_full-without-Doctor+NanGuard, ...
ABLATABLE = ("Doctor", "NanGuard", "StepLog", "GradNormLogger", "TensorBoardLogger", "CheckpointRotation")
WITHOUT = "engine_kit_full-without-"


def _left_out(variant: str) -> tuple[str, ...] | None:
    """The handlers an ablation variant leaves out (None: not an ablation variant).

    >>> _left_out("engine_kit_full-without-Doctor+StepLog"), _left_out("engine_kit_full")
    (('Doctor', 'StepLog'), None)
    """
    if not variant.startswith(WITHOUT):
        return None
    names = tuple(variant[len(WITHOUT):].split("+"))
    return names if names and all(name in ABLATABLE for name in names) else ()


def _is_full(variant: str) -> bool:
    return variant in FULL_VARIANTS or bool(_left_out(variant))


class _LeftOut:
    """Stands in for a handler class an ablation leaves out: built and attached, it does nothing."""

    writer = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def attach(self, *args: object, **kwargs: object) -> None:
        pass


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


def build_full(variant: str, case: Case, root: Path) -> Callable[[bool], None]:
    """``run_once(counted)``: build ``run.py``'s ``variant`` runner in a fresh directory and run it.

    Only a ``counted`` run goes through ``operator.call`` (building never does).
    An ablation variant (``engine_kit_full-without-A+B``) builds ``engine_kit_full``
    with ``attach_standard``'s handler classes ``A`` and ``B`` replaced by no-ops.
    """
    import handlers.standard as standard

    left_out = _left_out(variant) or ()
    build = builder("engine_kit_full" if left_out else variant)

    def run_once(counted: bool) -> None:
        workdir = Path(tempfile.mkdtemp(prefix=f"{variant.split('-')[0]}-", dir=root))
        originals = {name: getattr(standard, name) for name in left_out}
        try:
            for name in left_out:
                setattr(standard, name, _LeftOut)
            try:
                run = build(case, workdir)
            finally:
                for name, cls in originals.items():
                    setattr(standard, name, cls)
            operator.call(run) if counted else run()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    return run_once


def micro_batches(variant: str, case: Case) -> int:
    """Micro-batches one measured call of ``variant`` trains: an epoch, or a ``_full`` runner's whole run."""
    return case.iterations if _is_full(variant) else len(case.train)


def report(dump: Path, variants: tuple[str, ...]) -> None:
    """Print instructions per micro-batch from the dumps ``<dump>.1``, ``<dump>.2`` … (one per variant)."""
    case = build_case("mlp", torch.device("cpu"), "fp32", smoke=False)
    counts = {}
    for index, variant in enumerate(variants, start=1):
        text = Path(f"{dump}.{index}").read_text()
        total = int(re.search(r"^summary: (\d+)", text, re.MULTILINE).group(1))
        counts[variant] = total / micro_batches(variant, case)
    print("| variant | instructions per micro-batch | × reference |\n|---|---|---|")
    for variant, count in counts.items():
        ref = "raw_full" if _is_full(variant) else "raw"
        ratio = f"{count / counts[ref]:.3f}" if ref in counts else "—"
        print(f"| `{variant}` | {count / 1000:.1f} k | {ratio} |")


def main(argv: list[str] | None = None) -> int:
    """Measure (under callgrind: one dump per variant) or, with ``--report``, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, default=None, help="callgrind output file (without .1, .2 …)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = [v for v in variants if v not in VARIANTS and not _left_out(v)]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}, or {WITHOUT}A+B with A, B among {', '.join(ABLATABLE)}")
    if args.report is not None:
        report(args.report, variants)
        return 0
    torch.set_num_threads(1)
    case = build_case("mlp", torch.device("cpu"), "fp32", smoke=False)
    with tempfile.TemporaryDirectory(prefix="loop-instructions-") as tmp:
        calls = {}
        for variant in variants:
            if _is_full(variant):
                run_once = build_full(variant, case, Path(tmp))
                run_once(False)  # warm-up: lazy imports, the writers' first files
                calls[variant] = lambda run_once=run_once: run_once(True)
            else:
                epoch = build(variant, case)
                epoch()  # warm-up: allocator, lazy imports, optimizer state
                epoch()
                calls[variant] = lambda epoch=epoch: operator.call(epoch)  # counted inside operator.call only
        for variant, call in calls.items():
            start = time.process_time()
            call()
            per_batch = (time.process_time() - start) / micro_batches(variant, case) * 1e6
            print(f"{variant}: {per_batch:.1f} CPU µs per micro-batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
