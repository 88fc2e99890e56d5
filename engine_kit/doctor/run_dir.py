"""The doctor's findings of a finished (or crashed) run, from its logs alone: no model needed.

A run directory may hold ``doctor.json`` (what the ``Doctor`` handler found,
with the facts it judged by), ``steps.jsonl`` (the step log), ``run.json``
(the lab's run facts, with the validation history) and ``summary.json``.
Recorded findings come first; the step-log and overfitting checks run again
on the logs and add what the run did not record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine_kit.doctor.findings import CATALOGUE, DoctorSettings, Finding, add_new
from engine_kit.doctor.step_checks import check_steps
from engine_kit.doctor.validation_checks import check_overfitting
from engine_kit.errors import fix_message

FILES = ("doctor.json", "steps.jsonl", "run.json", "summary.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (none when missing); a line torn by a crash is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def diagnose_run(run_dir: str | Path, settings: DoctorSettings | None = None) -> list[Finding]:
    """Every finding for the run in ``run_dir``: recorded ones, then those its logs show.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "steps.jsonl").write_text("".join(
    ...     json.dumps({"step": s, "loss": 1.0, "grad_norm": 1.0}) + "\\n" for s in range(1, 13)))
    >>> [f.code for f in diagnose_run(folder)]
    ['loss-not-falling']
    """
    folder = Path(run_dir)
    if not any((folder / name).is_file() for name in FILES):
        raise FileNotFoundError(
            fix_message(f"{folder} holds none of {', '.join(FILES)}.",
                        "point at the run directory given to attach_standard(run_dir=...) or the lab's --run-dir.")
        )
    settings = settings or DoctorSettings()
    doctor = _read_json(folder / "doctor.json")
    run = _read_json(folder / "run.json")
    summary = _read_json(folder / "summary.json")
    recorded = doctor.get("findings") or summary.get("doctor") or []
    findings = [Finding.from_dict(entry) for entry in recorded]
    context = doctor.get("context") or {}
    rows = read_rows(folder / "steps.jsonl")
    max_grad_norm = context.get("max_grad_norm", run.get("max_grad_norm"))
    planned = context.get("planned_steps") or max((int(r["step"]) for r in rows), default=0)
    history = context.get("val_history") or run.get("val_history") or []
    best = (context.get("best_checkpoint") or (run.get("best") or {}).get("name"))
    add_new(findings, check_steps(rows, max_grad_norm, planned, settings, final=True))
    add_new(findings, check_overfitting(history, rows, settings, best))
    return findings


def report_lines(findings: list[Finding]) -> list[str]:
    """One line per finding, or one line saying there is none.

    >>> report_lines([])
    ['doctor: no findings.']
    """
    return [finding.line() for finding in findings] or ["doctor: no findings."]


def main(run_dir: str) -> int:
    """``engine-kit doctor RUN_DIR``: print the findings; exit 0 when there is none, 1 when there are, 2 on error."""
    try:
        findings = diagnose_run(run_dir)
    except FileNotFoundError as err:
        print(f"engine-kit doctor: {err}")
        return 2
    print("\n".join(report_lines(findings)))
    return 1 if findings else 0


def markdown_section(findings: list[Finding]) -> str:
    """The "Doctor" section of a run's ``summary.md``.

    >>> print(markdown_section([]).strip())
    ## Doctor
    <BLANKLINE>
    No findings.
    """
    lines = ["", "## Doctor", ""]
    lines += [f"- **{f.code}** ({CATALOGUE[f.code]}): {f.evidence} To fix: {f.fix}" for f in findings] or ["No findings."]
    return "\n".join(lines) + "\n"
