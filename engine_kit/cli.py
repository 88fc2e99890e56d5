"""The ``engine-kit`` command: check, inspect and repair checkpoints, rebuild run reports.

    engine-kit ckpt verify PATH     exit 0 when valid; else 1 and a one-line reason (a directory: every checkpoint)
    engine-kit ckpt inspect PATH    a human summary of a checkpoint file, or a directory's checkpoints each verified
    engine-kit ckpt repair DIR      rebuild the directory's index from the files that verify; print what changed
    engine-kit report RUN_DIR       regenerate plots and summary from a run's logs
    engine-kit doctor RUN_DIR       print the loop doctor's findings from a run's logs (exit 1 when any)

Checkpoints are never unpickled unsafely: reading goes through the trailer
check, the pickle allow-list scan and ``torch.load(weights_only=True)``;
nothing blocks on a FIFO, and ``verify`` streams in constant memory.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _report(run_dir: str) -> int:
    from engine_kit.report import write_report

    try:
        summary = write_report(run_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"engine-kit report: {err}")
        return 1
    print(f"wrote {run_dir}/summary.md, summary.json, curves.png, grad_norm_hist.png "
          f"(best {summary['metric']} {summary['best_metric']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine-kit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ckpt = commands.add_parser("ckpt", help="verify, inspect or repair checkpoints")
    ckpt_commands = ckpt.add_subparsers(dest="action", required=True)
    ckpt_commands.add_parser("verify", help="exit 0 if PATH (a file, or every checkpoint of a directory) is valid").add_argument("path")
    ckpt_commands.add_parser("inspect", help="summarize a checkpoint file, or verify and list a directory").add_argument("path")
    ckpt_commands.add_parser("repair", help="rebuild a directory's index from its files; print what changed").add_argument("path")
    commands.add_parser("report", help="rebuild plots and summary of a run directory").add_argument("run_dir")
    commands.add_parser("doctor", help="print the training mistakes found in a run directory").add_argument("run_dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``engine-kit`` console script.

    >>> main(["ckpt", "verify", "/nonexistent.ekpt"])
    INVALID /nonexistent.ekpt: ...
    1
    """
    args = build_parser().parse_args(argv)
    if args.command == "ckpt":
        from engine_kit.checkpoint import commands as ckpt

        action = {"verify": ckpt.verify_command, "inspect": ckpt.inspect_command, "repair": ckpt.repair_command}[args.action]
        return action(args.path)
    if args.command == "doctor":
        from engine_kit.doctor.run_dir import main as doctor_main

        return doctor_main(args.run_dir)
    return _report(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
