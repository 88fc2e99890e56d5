"""Plots and a run summary rebuilt from a run directory's logs.

Inputs (written during training): ``steps.jsonl`` (StepLog: one line per
optimizer step) and ``run.json`` (the run's facts: validation history, best
checkpoint, resumes, final parameter hash). Outputs: ``grad_norm_hist.png``,
``curves.png``, ``summary.json`` and ``summary.md``. ``engine-kit report RUN_DIR``
runs ``write_report``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from engine_kit.doctor.run_dir import diagnose_run, markdown_section
from engine_kit.errors import fix_message


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open() as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def load_run(run_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The step log rows and the run facts of ``run_dir``."""
    run_dir = Path(run_dir)
    steps_path, run_path = run_dir / "steps.jsonl", run_dir / "run.json"
    for path in (steps_path, run_path):
        if not path.is_file():
            raise FileNotFoundError(
                fix_message(f"{path} does not exist.", "point at the --run-dir of a finished lab run.")
            )
    return _read_jsonl(steps_path), json.loads(run_path.read_text())


def summarize(steps: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    """The numbers of ``summary.json``."""
    stepped = [row for row in steps if not row.get("skipped")]
    norms = [row["grad_norm"] for row in stepped if row.get("grad_norm") is not None]
    clipped = [row for row in stepped if row.get("clipped")]
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for row in steps:
        by_epoch[int(row["epoch"])].append(float(row["time"]))
    epoch_times = {epoch: max(t) - min(t) for epoch, t in sorted(by_epoch.items())}
    rates = [row["samples_per_s"] for row in stepped if row.get("samples_per_s")]
    history = run.get("val_history", [])
    metric = run.get("metric", "accuracy")
    # Only a validation of the final parameters counts as "final": never one from an earlier step.
    final_step = run.get("optimizer_steps")
    final_metric = next((h.get(metric) for h in reversed(history) if h.get("optimizer_steps") == final_step), None)
    return {
        "dataset": run.get("dataset"),
        "device": run.get("device"),
        "precision": run.get("precision"),
        "best_checkpoint": run.get("best"),
        "metric": metric,
        "final_metric": final_metric,
        "best_metric": (run.get("best") or {}).get("metric"),
        "optimizer_steps": run.get("optimizer_steps", len(stepped)),
        "skipped_steps": run.get("skipped_steps", len(steps) - len(stepped)),
        "clipped_fraction": len(clipped) / len(stepped) if stepped else 0.0,
        "max_grad_norm": run.get("max_grad_norm"),
        "grad_norm_median": sorted(norms)[len(norms) // 2] if norms else None,
        "wall_time_per_epoch_s": {str(k): round(v, 3) for k, v in epoch_times.items()},
        "samples_per_s": round(sorted(rates)[len(rates) // 2], 1) if rates else None,
        "resumed_from": run.get("resumed_from"),
        "resumes": run.get("resumes", []),
        "final_params_sha256": run.get("final_params_sha256"),
    }


def plot_grad_norm_histogram(steps: list[dict[str, Any]], max_grad_norm: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = [row["grad_norm"] for row in steps if not row.get("skipped") and row.get("grad_norm") is not None]
    norms = [n for n in norms if math.isfinite(n)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(norms, bins=min(40, max(5, len(norms) // 3)), color="#4878a8", edgecolor="white")
    if max_grad_norm is not None:
        clipped = sum(n > max_grad_norm for n in norms)
        ax.axvline(max_grad_norm, color="#c03030", linestyle="--", linewidth=2,
                   label=f"clip threshold {max_grad_norm:g} ({clipped}/{len(norms)} steps clipped)")
        ax.legend()
    ax.set_xlabel("pre-clip global gradient norm")
    ax.set_ylabel("optimizer steps")
    ax.set_title("Gradient norm per optimizer step (before clipping)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(steps: list[dict[str, Any]], run: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = run.get("metric", "accuracy")
    fig, loss_ax = plt.subplots(figsize=(8, 4.5))
    rows = [row for row in steps if not row.get("skipped")]
    loss_ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="#4878a8", linewidth=1.2,
                 label="train loss (window mean)")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("train loss", color="#4878a8")
    metric_ax = loss_ax.twinx()
    history = [h for h in run.get("val_history", []) if h.get(metric) is not None]
    metric_ax.plot([h["optimizer_steps"] for h in history], [h[metric] for h in history], color="#d08020",
                   marker="o", linewidth=2, label=f"validation {metric}")
    metric_ax.set_ylabel(f"validation {metric}", color="#d08020")
    for resume in run.get("resumes", []):
        loss_ax.axvline(resume["crashed_after_step"], color="#c03030", linestyle=":", linewidth=2)
        loss_ax.annotate(f"crash → resumed from step {resume['step']}", (resume["crashed_after_step"], 0.95),
                         xycoords=("data", "axes fraction"), color="#c03030", ha="right", fontsize=9)
    lines = loss_ax.get_legend_handles_labels()
    more = metric_ax.get_legend_handles_labels()
    loss_ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center right")
    title = f"Training loss and validation {metric}"
    if run.get("resumes"):
        title += " (one run, continued across the crash)"
    loss_ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any, missing: str = "None") -> str:
    if value is None:
        return missing
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _markdown(summary: dict[str, Any]) -> str:
    best = summary.get("best_checkpoint") or {}
    lines = [
        "# Run summary",
        "",
        f"- dataset: {summary['dataset']}, device: {summary['device']}, precision: {summary['precision']}",
        f"- best checkpoint: `{best.get('name')}` (step {best.get('step')}, "
        f"{summary['metric']} {_fmt(best.get('metric'))})",
        f"- final {summary['metric']}: {_fmt(summary['final_metric'], 'not measured at the final step')} "
        f"(best {_fmt(summary['best_metric'])})",
        f"- optimizer steps: {summary['optimizer_steps']}, skipped (fp16 overflow): {summary['skipped_steps']}",
        f"- steps clipped at {summary['max_grad_norm']}: {summary['clipped_fraction']:.1%}",
        f"- throughput: {summary['samples_per_s']} samples/s (median over steps)",
        f"- wall time per epoch (s): {summary['wall_time_per_epoch_s']}",
        f"- resumed from: {summary['resumed_from']}",
        f"- final parameters SHA-256: `{summary['final_params_sha256']}`",
        "",
        "![curves](curves.png)",
        "",
        "![gradient norms](grad_norm_hist.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Regenerate the plots and ``summary.{json,md}`` of ``run_dir``; returns the summary."""
    run_dir = Path(run_dir)
    steps, run = load_run(run_dir)
    summary = summarize(steps, run)
    findings = diagnose_run(run_dir)  # what the Doctor recorded, and what these logs show
    summary["doctor"] = [finding.to_dict() for finding in findings]
    plot_grad_norm_histogram(steps, run.get("max_grad_norm"), run_dir / "grad_norm_hist.png")
    plot_curves(steps, run, run_dir / "curves.png")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "summary.md").write_text(_markdown(summary) + markdown_section(findings))
    return summary
