"""engine_kit against a hand-written loop, ignite and Lightning: one recipe, one run, side by side.

Every runner trains the same seeded model on the same pre-built device
batches with the same recipe (AdamW, accumulation 4, clipping at 1.0 where
the framework has it); the ``_full`` runners add OneCycleLR per optimizer
step, validation each epoch, a checkpoint every N optimizer steps and the
loss logged at a cadence. Runners are timed after a warm-up run each, in
interleaved repeats that start at a rotating runner; tables give medians,
min–max and the ratio to ``raw`` (``raw_full`` for ``_full`` runners).
See ``benchmarks/README.md`` for what each runner does and does not do.

    python benchmarks/run.py                          # CPU: mlp and cnn, fp32, every runner
    python benchmarks/run.py --threads 1              # the same on a CPU shared with other jobs
    python benchmarks/run.py --device cuda            # every model, bf16 and fp16
    python benchmarks/run.py --only mlp,raw,engine_kit --repeats 9
    python benchmarks/run.py --smoke --json out.json  # seconds; checks it runs, numbers mean nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from _env import describe, environment
from lightning_env import import_lightning
from measure import measure_case
from models import MODELS, build_case, describe_models
from report import tables
from runners import RUNNERS, lightning_available

CPU_MODELS = ("mlp", "cnn")  # resnet18 and the GPT take minutes per run on a CPU: ask with --only
PRECISIONS = {"cpu": ("fp32",), "cuda": ("bf16", "fp16")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", default="", help="comma-separated models and/or runners to run, e.g. mlp,raw,engine_kit")
    parser.add_argument("--precisions", default="", help="comma-separated, default fp32 on cpu, bf16,fp16 on cuda")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed runs of each runner")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per timed run (default: each model's own)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own); 1 on a CPU shared with other jobs")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat, no warm-up: seconds")
    parser.add_argument("--json", type=Path, default=None, help="write every record to this file")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in MODELS and n not in RUNNERS]
    if unknown:
        parser.error(f"--only: unknown {unknown}; models are {', '.join(MODELS)}, runners {', '.join(RUNNERS)}")
    default_models = CPU_MODELS if args.device == "cpu" and not args.smoke else MODELS
    args.models = tuple(n for n in MODELS if n in names) or default_models
    runners = tuple(n for n in RUNNERS if n in names) or RUNNERS
    args.skipped = tuple(n for n in runners if n.startswith("lightning") and not lightning_available())
    args.runners = tuple(n for n in runners if n not in args.skipped)
    args.precisions = tuple(p for p in args.precisions.split(",") if p) or PRECISIONS[args.device]
    if args.device == "cpu" and set(args.precisions) - {"fp32", "bf16"}:
        parser.error("--precisions: on the CPU only fp32 and bf16 exist (fp16 needs a GradScaler on CUDA)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.smoke:
        args.repeats = 1
        if args.threads is None:
            args.threads = 1  # a smoke run checks that everything runs; one thread never oversubscribes
    if args.repeats < 1 or any(v is not None and v < 1 for v in (args.epochs, args.threads)):
        parser.error("--repeats, --epochs and --threads must be >= 1")
    return args


def versions() -> dict[str, Any]:
    """torch, ignite and Lightning versions (Lightning None when not installed)."""
    import ignite

    lightning = None
    if lightning_available():
        lightning = import_lightning().__version__  # its environment stays Lightning's runners' own
    return {"torch": torch.__version__, "ignite": ignite.__version__, "lightning": lightning}


def main(argv: list[str] | None = None) -> int:
    """Measure, print the tables, optionally write the JSON; returns the exit status."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # The synthetic data trips the same doctor findings (a flat loss, decay on biases) in every
    # engine_kit_full run; the checks still run and write doctor.json, only their log lines are not
    # printed between the tables.
    logging.getLogger("engine_kit.doctor").setLevel(logging.ERROR)
    env = environment(device)
    stamp = {**versions(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "commit": env["commit"]}
    print(describe(env) + (f"; lightning {stamp['lightning']}" if stamp["lightning"] else "; lightning not installed"))
    if args.skipped:
        print(f"skipped (Lightning not installed, pip install -e '.[bench]'): {', '.join(args.skipped)}")
    config = {"device": args.device, "models": args.models, "runners": args.runners, "skipped": args.skipped,
              "precisions": args.precisions, "repeats": args.repeats, "smoke": args.smoke, "threads": torch.get_num_threads(),
              "schedules": describe_models(args.smoke), "command": " ".join(["benchmarks/run.py", *sys.argv[1:]])}
    records: list[dict[str, Any]] = []
    for name in args.models:
        for precision in args.precisions:
            case = build_case(name, device, precision, args.smoke)
            if args.epochs is not None:
                case.schedule = type(case.schedule)(**{**vars(case.schedule), "epochs": args.epochs})
            results = measure_case(case, args.runners, args.repeats, warmup=not args.smoke)
            rows = [{"model": name, "precision": precision, "device": args.device, **r, **stamp} for r in results]
            print()
            print(tables(rows), flush=True)
            records += rows
            if args.json is not None:  # after every case, so a run cut short keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"environment": env, "config": config, "records": records}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
