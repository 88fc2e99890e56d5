"""The runnable examples, run as a user would (subprocess, --quick) and checked for sense."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def run_example(name: str, out_json: Path, timeout: float) -> dict:
    """Run ``examples/<name> --quick --out-json out_json`` from the repo root; return the JSON."""
    subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--quick", "--out-json", str(out_json)],
        check=True,
        timeout=timeout,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return json.loads(out_json.read_text())


@pytest.fixture(scope="module")
def char_lm(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_example("char_lm.py", tmp_path_factory.mktemp("char_lm") / "out.json", timeout=120)


@pytest.fixture(scope="module")
def custom_events(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_example("custom_events.py", tmp_path_factory.mktemp("custom_events") / "out.json", timeout=60)


def test_doctor_demo_finds_exactly_the_three_planted_mistakes(tmp_path: Path) -> None:
    found = run_example("doctor_demo.py", tmp_path / "out.json", timeout=120)
    assert sorted(found["codes"]) == ["probabilities-into-logits-loss", "validation-overlap", "weight-decay-on-norms"]


def test_char_lm_loss_falls(char_lm: dict) -> None:
    losses = char_lm["losses"]
    assert len(losses) == char_lm["optimizer_steps"] == 40
    assert char_lm["first_loss"] == losses[0] and char_lm["last_loss"] == losses[-1]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # From about ln(vocab) to at least character-frequency level in 40 steps.
    assert last < first - 1.0, (first, last)


def test_char_lm_samples_text(char_lm: dict) -> None:
    sample = char_lm["sample"]
    assert isinstance(sample, str) and sample.startswith("def ") and len(sample.strip()) > len("def")


def test_custom_events_fire_as_expected(custom_events: dict) -> None:
    # The warmup → decay crossing happens exactly once in a warmup-cosine run.
    assert custom_events["lr_phase_changed"] == 1
    (phase_step,) = custom_events["event_steps"]["lr_phase_changed"]
    assert custom_events["warmup_steps"] < phase_step <= custom_events["warmup_steps"] + 2
    # NEW_BEST fires once per strict improvement of validation accuracy (the first counts).
    history = custom_events["accuracy_history"]
    improvements = sum(1 for i, acc in enumerate(history) if i == 0 or acc > max(history[:i]))
    assert custom_events["new_best"] == improvements >= 1
    assert custom_events["optimizer_steps"] == custom_events["total_steps"]
