"""Checkpoint cost for a ~25M-parameter model: one save, and the stall it puts in training.

The model is an MLP ``1024 → 4096 → 4096 → 1024`` (25.2M parameters, 101 MB
in fp32) trained with AdamW, whose two moment buffers make a checkpoint of
about 302 MB. Two measurements, each side by side with a raw reference:

1. **One save in isolation** (median over ``--repeats``, interleaved): a
   ``handlers.CheckpointRotation`` save, the way it runs at an epoch end
   (capture the training state, serialize, SHA-256 trailer, pickle scan,
   atomic write + fsync of file and directory, registry update, rotation:
   every save repeats the same optimizer step, so each one supersedes and
   deletes the previous file, one deletion per save as in a steady run),
   against a plain ``torch.save`` of model + optimizer state to the same
   directory (no fsync, overwriting one file, as nanoGPT does) and the same
   ``torch.save`` followed by ``fsync``. The engine_kit save is
   split by timing probes wrapped around the functions it calls.
2. **The training stall** (``--stall-repeats`` interleaved repeats): a loop of
   ``--steps`` optimizer steps run with and without a save every ``--every``
   steps, for the engine_kit trainer (``CheckpointRotation(every_steps=...)``)
   and for a raw loop (``torch.save`` every N steps). Stall per checkpoint =
   (run time with saves − run time without) / saves, paired within a repeat,
   median over repeats.

Everything is written under a temporary directory (inside ``--dir`` when
given) that is removed at the end. ``--device cuda`` runs the same on a GPU
(synchronizing before every clock read).

Run from the repository root::

    python benchmarks/checkpoint_save.py                  # CPU, ~75 s on 2 cores
    python benchmarks/checkpoint_save.py --device cuda
    python benchmarks/checkpoint_save.py --smoke          # a tiny model, a few seconds
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
from ignite.engine import Events

import engine_kit.checkpoint.fileformat as fileformat
import engine_kit.checkpoint.registry as registry
import handlers.checkpoint as checkpoint_handler
from engine_kit import create_trainer
from handlers import CheckpointRotation

from _env import describe, environment

ISOLATED = ("CheckpointRotation save", "torch.save (no fsync)", "torch.save + fsync")
LOOPS = ("engine_kit", "engine_kit + CheckpointRotation", "raw loop", "raw loop + torch.save")
# (module, function name, label): the calls a CheckpointRotation save is split into.
# None of them calls another, so no time is counted twice.
PROBES = (
    (checkpoint_handler, "capture_training_state", "capture state"),
    (torch, "save", "serialize (torch.save to memory)"),
    (hashlib, "sha256", "SHA-256 ×2 (trailer, registry digest)"),
    (fileformat, "_scan_archive", "pickle scan"),
    (fileformat, "atomic_write", "checkpoint file: atomic write + fsyncs"),
    (registry, "atomic_write", "registry.json writes (commit, retag, rotation)"),
)
OTHER = "rest (buffer copy, unlinking the rotated file, bookkeeping)"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock read covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(width: int, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The MLP ``width/4 → width → width → width/4`` and its AdamW optimizer, seeded."""
    torch.manual_seed(0)
    io_width = width // 4
    model = torch.nn.Sequential(
        torch.nn.Linear(io_width, width), torch.nn.ReLU(),
        torch.nn.Linear(width, width), torch.nn.ReLU(),
        torch.nn.Linear(width, io_width),
    ).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def make_data(steps: int, batch: int, width: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` regression batches, already on ``device``."""
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, width // 4, generator=gen).to(device), torch.randn(batch, width // 4, generator=gen).to(device))
            for _ in range(steps)]


@contextlib.contextmanager
def probes(totals: dict[str, float], device: torch.device) -> Iterator[None]:
    """Add the time spent in each of ``PROBES`` to ``totals`` while the block runs.

    Probes whose target no longer exists (the code moved) are skipped; their
    time then shows up in ``OTHER``.
    """
    originals = []
    for module, name, label in PROBES:
        original = getattr(module, name, None)
        if original is None:
            continue

        def timed(*args: Any, _original: Callable = original, _label: str = label, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                sync(device)
                totals[_label] += time.perf_counter() - start

        originals.append((module, name, original))
        setattr(module, name, timed)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def raw_payload(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a hand-written loop saves: model and optimizer state."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def measure_isolated(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list, root: Path,
                     repeats: int, device: torch.device) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Time single saves, interleaved; return the table rows and the file sizes."""
    trainer = create_trainer(model, optimizer, torch.nn.functional.mse_loss, device=device)
    ekpt_dir = root / "isolated-ekpt"
    rotation = CheckpointRotation(ekpt_dir, every_steps=None, at_epoch_end=True, keep_last=2)
    rotation.attach(trainer)
    # Two steps give AdamW its state; the epoch end saves once, and the warm-up
    # save below reopens the directory the run's end closed.
    trainer.run(data[:2], max_epochs=1)
    trainer.fire_event(Events.EPOCH_COMPLETED)
    raw_path = root / "raw.pt"
    fsync_path = root / "raw-fsync.pt"

    def ekpt_save() -> None:
        trainer.fire_event(Events.EPOCH_COMPLETED)  # CheckpointRotation's epoch-end save

    def torch_save() -> None:
        torch.save(raw_payload(model, optimizer), raw_path)

    def torch_save_fsync() -> None:
        with open(fsync_path, "wb") as fileobj:
            torch.save(raw_payload(model, optimizer), fileobj)
            fileobj.flush()
            os.fsync(fileobj.fileno())

    actions = {ISOLATED[0]: ekpt_save, ISOLATED[1]: torch_save, ISOLATED[2]: torch_save_fsync}
    times: dict[str, list[float]] = defaultdict(list)
    splits: list[dict[str, float]] = []
    for r in range(repeats):
        shift = r % len(ISOLATED)
        for name in ISOLATED[shift:] + ISOLATED[:shift]:
            gc.collect()
            sync(device)
            split: dict[str, float] = defaultdict(float)
            with probes(split, device) if name == ISOLATED[0] else contextlib.nullcontext():
                start = time.perf_counter()
                actions[name]()
                sync(device)
                elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            if name == ISOLATED[0]:
                split[OTHER] = elapsed - sum(split.values())
                splits.append(dict(split))
    saved = trainer.state.checkpoints_saved
    sizes = {
        "ekpt_bytes": os.path.getsize(trainer.state.last_checkpoint),
        "torch_save_bytes": os.path.getsize(raw_path),
        "checkpoints_written": saved,
        "files_kept": sorted(p.name for p in ekpt_dir.glob("*.ekpt")),
    }
    rotation.close()
    raw_median = statistics.median(times[ISOLATED[1]])
    rows = []
    for name in ISOLATED:
        median = statistics.median(times[name])
        rows.append({"save": name, "median_s": median, "min_s": min(times[name]), "max_s": max(times[name]),
                     "ratio_torch_save": median / raw_median, "samples_s": times[name]})
        if name == ISOLATED[0]:
            for label in [p[2] for p in PROBES] + [OTHER]:
                values = [s.get(label, 0.0) for s in splits]
                rows.append({"save": f"of which: {label}", "median_s": statistics.median(values),
                             "min_s": min(values), "max_s": max(values), "ratio_torch_save": None, "samples_s": values})
    return rows, sizes


def measure_stall(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list, root: Path,
                  repeats: int, every: int, device: torch.device) -> list[dict[str, Any]]:
    """Time whole training loops with and without periodic saves, interleaved."""
    loss_fn = torch.nn.functional.mse_loss
    counter = 0

    def engine_kit_loop(with_saves: bool) -> tuple[float, list[float], int]:
        nonlocal counter
        counter += 1
        trainer = create_trainer(model, optimizer, loss_fn, device=device)
        directory = root / f"stall-{counter:03d}"
        if with_saves:
            CheckpointRotation(directory, every_steps=every, at_epoch_end=False, keep_last=2).attach(trainer)
        steps: list[float] = []
        clock = [0.0]

        @trainer.on(Events.ITERATION_STARTED)
        def _start(_: Any) -> None:
            clock[0] = time.perf_counter()

        @trainer.on(Events.ITERATION_COMPLETED)
        def _stop(_: Any) -> None:
            sync(device)
            steps.append(time.perf_counter() - clock[0])

        gc.collect()
        sync(device)
        start = time.perf_counter()
        state = trainer.run(data, max_epochs=1)
        sync(device)
        elapsed = time.perf_counter() - start
        # Untimed: 300 MB files from every run would otherwise pile up until the end.
        shutil.rmtree(directory, ignore_errors=True)
        return elapsed, steps, state.checkpoints_saved

    def raw_loop(with_saves: bool) -> tuple[float, list[float], int]:
        steps: list[float] = []
        saves = 0
        path = root / "raw-loop.pt"
        model.train()
        gc.collect()
        sync(device)
        start = time.perf_counter()
        for i, (x, y) in enumerate(data, start=1):
            step_start = time.perf_counter()
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if with_saves and i % every == 0:
                torch.save(raw_payload(model, optimizer), path)
                saves += 1
            sync(device)
            steps.append(time.perf_counter() - step_start)
        return time.perf_counter() - start, steps, saves

    loops = {
        LOOPS[0]: lambda: engine_kit_loop(False),
        LOOPS[1]: lambda: engine_kit_loop(True),
        LOOPS[2]: lambda: raw_loop(False),
        LOOPS[3]: lambda: raw_loop(True),
    }
    totals: dict[str, list[float]] = defaultdict(list)
    medians: dict[str, list[float]] = defaultdict(list)
    excess: dict[str, list[float]] = defaultdict(list)
    saves: dict[str, int] = {}
    # Saves land in steps every, 2*every, ...; one on the epoch's last step waits
    # for the epoch end (outside any step) and is left out of the in-run estimate.
    save_steps = {i for i in range(every, len(data), every)}
    for r in range(repeats):
        shift = r % len(LOOPS)
        for name in LOOPS[shift:] + LOOPS[:shift]:
            total, steps, count = loops[name]()
            totals[name].append(total)
            plain = [t for i, t in enumerate(steps, start=1) if i not in save_steps]
            medians[name].append(statistics.median(plain))
            saves[name] = count
            if count and save_steps:
                # The same run's ordinary steps are the baseline: immune to load
                # that changes between runs.
                extra = sum(steps[i - 1] for i in save_steps) - len(save_steps) * statistics.median(plain)
                excess[name].append(extra / len(save_steps))
    rows = []
    for name in LOOPS:
        row = {"loop": name, "steps": len(data), "saves": saves[name], "median_step_s": statistics.median(medians[name]),
               "median_run_s": statistics.median(totals[name]), "run_samples_s": totals[name],
               "stall_per_save_s": None, "save_step_excess_s": None}
        if saves[name]:
            base = totals[LOOPS[LOOPS.index(name) - 1]]
            row["stall_per_save_s"] = statistics.median((w - b) / saves[name] for w, b in zip(totals[name], base))
            if excess[name]:
                row["save_step_excess_s"] = statistics.median(excess[name])
        rows.append(row)
    return rows


def tables(isolated: list[dict[str, Any]], stall: list[dict[str, Any]], sizes: dict[str, Any]) -> str:
    """Both result tables as markdown."""
    mb = sizes["ekpt_bytes"] / 1e6
    lines = [
        "| one save | median (s) | min–max (s) | × torch.save | MB/s |",
        "|---|---|---|---|---|",
    ]
    for row in isolated:
        ratio = "" if row["ratio_torch_save"] is None else f"{row['ratio_torch_save']:.2f}"
        rate = "" if row["ratio_torch_save"] is None else f"{mb / row['median_s']:.0f}"
        lines.append(f"| {row['save']} | {row['median_s']:.3f} | {row['min_s']:.3f}–{row['max_s']:.3f} | {ratio} | {rate} |")
    lines += [
        "",
        "| training loop | steps | saves | median step without a save (s) | run (s, median) "
        "| stall per save (s) | save step − median step (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in stall:
        stall_text = "—" if row["stall_per_save_s"] is None else f"{row['stall_per_save_s']:.3f}"
        excess_text = "—" if row["save_step_excess_s"] is None else f"{row['save_step_excess_s']:.3f}"
        lines.append(f"| {row['loop']} | {row['steps']} | {row['saves']} | {row['median_step_s']:.3f} | "
                     f"{row['median_run_s']:.2f} | {stall_text} | {excess_text} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked; ``--smoke`` overrides the sizes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (or 'cuda:N')")
    parser.add_argument("--width", type=int, default=4096, help="hidden width; 4096 gives 25.2M parameters")
    parser.add_argument("--batch", type=int, default=8, help="samples per training step")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the isolated saves")
    parser.add_argument("--stall-repeats", type=int, default=5, help="interleaved repeats of the training loops")
    parser.add_argument("--steps", type=int, default=13, help="optimizer steps per training loop")
    parser.add_argument("--every", type=int, default=6, help="optimizer steps between saves in the loops")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary directory (default: system temp)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and counts: only checks the script works")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.width, args.repeats, args.stall_repeats, args.steps, args.every = 64, 1, 1, 5, 2
    for name in ("width", "batch", "repeats", "stall_repeats", "steps", "every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.every > args.steps:
        parser.error("--every must not exceed --steps, or the loops save nothing")
    if args.width % 4:
        parser.error("--width must be a multiple of 4")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device: {err}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available here")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure, print the markdown table(s), optionally write the JSON; returns the exit status."""
    args = parse_args(argv)
    device = args.device
    model, optimizer = make_model(args.width, device)
    params = sum(p.numel() for p in model.parameters())
    data = make_data(args.steps, args.batch, args.width, device)
    with tempfile.TemporaryDirectory(prefix="ek-bench-ckpt-", dir=args.dir) as tmp:
        root = Path(tmp)
        isolated, sizes = measure_isolated(model, optimizer, data, root, args.repeats, device)
        stall = measure_stall(model, optimizer, data, root, args.stall_repeats, args.every, device)
        env = {**environment(device), "directory": tmp}
    print(f"checkpoint cost: MLP {args.width // 4}-{args.width}-{args.width}-{args.width // 4}, {params / 1e6:.1f}M parameters, "
          f"AdamW, fp32, batch {args.batch}, on {device}; checkpoint {sizes['ekpt_bytes'] / 1e6:.0f} MB "
          f"(torch.save of model + optimizer: {sizes['torch_save_bytes'] / 1e6:.0f} MB); "
          f"{args.repeats} isolated repeats, {args.stall_repeats} loop repeats of {args.steps} steps, a save every {args.every}")
    print(f"{describe(env)}; files under {env['directory']}")
    print()
    print(tables(isolated, stall, sizes))
    if args.json is not None:
        config = {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items() if k != "json"}
        config["parameters"] = params
        args.json.write_text(json.dumps({"environment": env, "config": config, "sizes": sizes,
                                         "isolated": isolated, "stall": stall}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
