"""Checkpoint cost for a ~25M-parameter model, side by side: one save, the stall in training, memory.

The model is an MLP ``1024 → 4096 → 4096 → 1024`` (25.2M parameters, 101 MB
in fp32) trained with AdamW, whose two moment buffers make a checkpoint of
about 302 MB. Rows (``checkpoint_bench/savers.py``): ``torch.save``,
``torch.save`` + fsync, a plain copy of the state (the floor of any
snapshot), ``torch.distributed.checkpoint.async_save``, Lightning's
``AsyncCheckpointIO`` (skipped when Lightning is not importable), and
engine_kit's ``CheckpointRotation`` synchronous, asynchronous with a copied
snapshot, and asynchronous with the fence (when this commit has it).
Columns, all from one run:

1. **One save in isolation** (``--repeats``, interleaved): seconds until the
   save returns (training may go on) and until its file is durable.
2. **Training stall per save** (``--loop-repeats``, interleaved): ``--steps``
   steps of an engine_kit trainer with no saves and, per row, with a save
   every ``--every`` steps; (run with saves − the same repeat's run without)
   / saves, median over repeats. Every step is timed; steps that started
   while a write was in flight are compared with the same run's steps that
   started without one (the in-flight slowdown).
3. **Extra peak host memory per save**: each row in a fresh subprocess, peak
   RSS of a short loop with saves minus that of the same loop without
   (``checkpoint_bench/memory.py``: the kernel's ``VmHWM``, reset between
   the loops; torch's allocations are invisible to ``tracemalloc``).

Then the acceptance ratios of the async rows (stall against the plain copy
and against ``torch.save``, the in-flight slowdown). Files go to a
temporary directory (inside ``--dir`` when given), removed at the end.
``--device cuda`` runs the same on a GPU, synchronizing before every clock
read; the plain copy then copies into reused pinned host buffers.

Run from the repository root::

    python benchmarks/checkpoint_save.py                  # CPU, ~5 min on 2 cores
    python benchmarks/checkpoint_save.py --device cuda
    python benchmarks/checkpoint_save.py --smoke          # a tiny model: only checks that it runs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from _env import describe, environment
from checkpoint_bench import memory, report, savers, timing
from checkpoint_bench.workload import make_data, make_model, state_bytes

# Loop sizes per device: a write (~1 s for 302 MB) must finish within the steps between two saves.
DEFAULTS = {
    "cpu": {"batch": 8, "steps": 56, "every": 20},  # a step takes ~0.12 s on 2 cores
    "cuda": {"batch": 1024, "steps": 850, "every": 300},  # a step takes milliseconds: 250 steps after the last save
}
SMOKE = {"width": 64, "repeats": 1, "loop_repeats": 1, "steps": 7, "every": 3, "threads": 1}
# A memory subprocess imports torch (seconds); the smoke run measures these rows only, side by side.
SMOKE_MEMORY_ROWS = (savers.PLAIN_COPY, savers.EK_COPY)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked; ``--smoke`` overrides the sizes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (or 'cuda:N')")
    parser.add_argument("--width", type=int, default=4096, help="hidden width; 4096 gives 25.2M parameters")
    parser.add_argument("--batch", type=int, default=None, help="samples per training step (CPU 8, CUDA 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the isolated saves")
    parser.add_argument("--loop-repeats", "--stall-repeats", dest="loop_repeats", type=int, default=3,
                        help="interleaved repeats of the training loops")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per training loop (CPU 56, CUDA 850)")
    parser.add_argument("--every", type=int, default=None, help="optimizer steps between saves in the loops (CPU 20, CUDA 300)")
    parser.add_argument("--only", default=None, help="comma-separated row names to run (default: every row)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default on CPU: 1, so training has one core and the writer the other; "
                             "0: torch's choice)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory subprocesses")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary directory (default: system temp)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and counts: only checks the script works")
    parser.add_argument("--json", type=Path, default=None, help="also write every repeat's numbers to this file")
    parser.add_argument("--memory-row", default=None, help=argparse.SUPPRESS)  # the memory subprocess's entry
    args = parser.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device: {err}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available here")
    for name, value in DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke:
        vars(args).update(SMOKE)
    for name in ("width", "batch", "repeats", "loop_repeats", "steps", "every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}")
    if args.every > args.steps or args.steps % args.every == 0:
        parser.error(f"--steps {args.steps} must exceed --every {args.every} and not be a multiple of it "
                     "(a save on an epoch's last step waits for the epoch end, outside every step)")
    if args.width % 4:
        parser.error(f"--width must be a multiple of 4, not {args.width}")
    args.rows = list(savers.ROWS) if args.only is None else [r.strip() for r in args.only.split(",")]
    unknown = sorted(set(args.rows) - set(savers.ROWS))
    if unknown:
        parser.error(f"--only: unknown rows {unknown}; the rows are {list(savers.ROWS)}")
    return args


def memory_child(args: argparse.Namespace) -> int:
    """The memory subprocess: measure one row, print its record as one JSON line."""
    with tempfile.TemporaryDirectory(prefix="ek-bench-mem-", dir=args.dir) as tmp:
        record = memory.measure_in_this_process(args.memory_row, args.width, args.batch, args.device, Path(tmp))
    print(json.dumps(record))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Measure, print the markdown tables, optionally write the JSON; returns the exit status."""
    args = parse_args(argv)
    if args.threads is None and torch.device(args.device).type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    # DCP's notes on every single-process save and on overwriting its own previous checkpoint: expected here.
    warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process", category=UserWarning)
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint in", category=UserWarning)
    if args.memory_row is not None:
        return memory_child(args)
    started = time.perf_counter()
    device = args.device
    skipped = {name: reason for name in args.rows if (reason := savers.unavailable(name))}
    names = [name for name in args.rows if name not in skipped]
    model, optimizer = make_model(args.width, device)
    params = sum(p.numel() for p in model.parameters())
    data = make_data(args.steps, args.batch, args.width, device)
    with tempfile.TemporaryDirectory(prefix="ek-bench-ckpt-", dir=args.dir) as tmp:
        root = Path(tmp)
        timing.run_loop(None, model, optimizer, data[:2], root, args.every, device)  # AdamW state, warm caches
        state_mb = state_bytes(model, optimizer) / 1e6
        isolated = timing.time_isolated(names, model, optimizer, data, root, args.repeats, device)
        loops = timing.time_loops(names, model, optimizer, data, root, args.loop_repeats, args.every, device)
        memory_rows = [name for name in names if name in SMOKE_MEMORY_ROWS] if args.smoke else names
        mem = memory.measure_rows(memory_rows, args.width, args.batch, device, root, threads=args.threads,
                                  jobs=len(memory_rows) if args.smoke else 1) if args.memory else {}
        env = {**environment(device), "directory": tmp}
    writes_file = {name: name != savers.PLAIN_COPY for name in names}
    rows = report.summarize(names, isolated, loops, mem, writes_file)
    checks = report.acceptance(rows)
    print(f"checkpoint cost: MLP {args.width // 4}-{args.width}-{args.width}-{args.width // 4}, {params / 1e6:.1f}M parameters, "
          f"AdamW, fp32, batch {args.batch}, on {device}; model + optimizer state {state_mb:.0f} MB; "
          f"{args.repeats} isolated repeats; {args.loop_repeats} loop repeats of {args.steps} steps, a save every {args.every}; "
          f"memory: {memory.describe(next(iter(mem.values()))) if mem else 'not measured'}")
    print(f"{describe(env)}; files under {env['directory']}; {time.perf_counter() - started:.0f} s")
    print()
    print(report.tables(rows, checks, skipped, report.baseline_step(loops), state_mb))
    if args.json is not None:
        config = {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()
                  if k not in ("json", "memory_row")}
        config["parameters"] = params
        config["state_bytes"] = round(state_mb * 1e6)
        args.json.write_text(json.dumps({"environment": env, "config": config, "rows": rows, "acceptance": checks,
                                         "skipped": skipped, "isolated": isolated, "loops": loops, "memory": mem},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
