"""The ``engine-kit`` command: check and inspect checkpoints, rebuild run reports.

    engine-kit ckpt verify PATH     exit 0 when valid; else 1 and a one-line reason
    engine-kit ckpt inspect PATH    a human summary of a checkpoint (file or directory)
    engine-kit report RUN_DIR       regenerate plots and summary from a run's logs

Checkpoints are never unpickled unsafely: reading goes through the trailer
check, the pickle allow-list scan and ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Any, Sequence

from engine_kit.errors import CheckpointError


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def _invalid(path: str, err: Exception) -> int:
    print(f"INVALID {path}: {str(err).splitlines()[0]}")
    return 1


def _verify(path: str) -> int:
    from engine_kit.checkpoint import verify_checkpoint_file

    try:
        info = verify_checkpoint_file(path)
    except (CheckpointError, OSError) as err:
        return _invalid(path, err)
    print(f"OK {path} ({_human_size(info.size_bytes)}, sha256 {info.sha256[:16]}...)")
    return 0


def _describe_payload(path: str, payload: dict[str, Any], size: int) -> list[str]:
    import torch

    meta = payload.get("meta") or {}
    created = meta.get("created")
    when = datetime.datetime.fromtimestamp(created).isoformat(timespec="seconds") if created else "?"
    model = payload.get("model") or {}
    n_params = sum(t.numel() for t in model.values() if isinstance(t, torch.Tensor))
    sections = {k: v for k, v in payload.items() if k not in ("meta",)}
    lines = [
        f"checkpoint {path}",
        f"  size            {_human_size(size)}",
        f"  optimizer step  {meta.get('optimizer_steps')}  (iteration {meta.get('iteration')}, epoch {meta.get('epoch')})",
        f"  metric          {meta.get('metric')}",
        f"  precision       {meta.get('precision')}",
        f"  optimizer       {(meta.get('optimizer') or {}).get('class')}",
        f"  model           {len(model)} tensors, {n_params:,} values",
        f"  handlers        {sorted((payload.get('stateful') or {}).keys())}",
        f"  sections        {sorted(sections)}",
        f"  written         {when} by engine_kit {meta.get('engine_kit_version')}, torch {meta.get('torch_version')}, "
        f"format {meta.get('format_version')}",
    ]
    return lines


def _inspect(path: str) -> int:
    from engine_kit.checkpoint import CheckpointDirectory, load_checkpoint_file

    try:
        if os.path.isdir(path):
            directory = CheckpointDirectory(path, read_only=True)
            entries = directory.entries()
            print(f"checkpoint directory {os.path.abspath(path)}: {len(entries)} registered")
            for e in entries:
                print(f"  {e.name}  step {e.step}  epoch {e.epoch}  metric {e.metric}  tags {list(e.tags)}  {_human_size(e.size)}")
            return 0
        payload = load_checkpoint_file(path)
    except (CheckpointError, OSError) as err:
        return _invalid(path, err)
    print("\n".join(_describe_payload(path, payload, os.path.getsize(path))))
    return 0


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
    ckpt = commands.add_parser("ckpt", help="verify or inspect checkpoints")
    ckpt_commands = ckpt.add_subparsers(dest="action", required=True)
    ckpt_commands.add_parser("verify", help="exit 0 if PATH is a valid checkpoint").add_argument("path")
    ckpt_commands.add_parser("inspect", help="summarize a checkpoint file or directory").add_argument("path")
    commands.add_parser("report", help="rebuild plots and summary of a run directory").add_argument("run_dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``engine-kit`` console script.

    >>> main(["ckpt", "verify", "/nonexistent.ekpt"])
    INVALID /nonexistent.ekpt: ...
    1
    """
    args = build_parser().parse_args(argv)
    if args.command == "ckpt":
        return _verify(args.path) if args.action == "verify" else _inspect(args.path)
    return _report(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
