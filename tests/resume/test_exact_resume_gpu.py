"""Exact resume on CUDA: dropout on the CUDA generator and fp16 GradScaler state (checkpoint acceptance 3).

Skipped without CUDA. Same procedure as test_exact_resume.py: an uninterrupted
run against a run killed with os._exit mid-window and resumed.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.resume.test_exact_resume import _start, _wait

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_resume_is_bitwise(tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    flags = ["--device", "cuda", "--precision", precision]
    ref = _start(tmp_path / "ref", tmp_path / "ref.json", 0, 4, flags)
    _wait({"ref": ref}, 0)
    crash = _start(tmp_path / "c", tmp_path / "c.json", 0, 4, [*flags, "--crash-at-iteration", "23"])
    _wait({"crash": crash}, 17)
    resumed = _start(tmp_path / "c", tmp_path / "c.json", 0, 4, [*flags, "--resume"])
    _wait({"resumed": resumed}, 0)
    want = json.loads((tmp_path / "ref.json").read_text())
    got = json.loads((tmp_path / "c.json").read_text())
    assert got["resumed_from"]
    assert got["losses"] == want["losses"]
    assert got["params"] == want["params"] and got["optimizer"] == want["optimizer"]
    assert got["scaler"] == want["scaler"]  # GradScaler scale and growth tracker carried over
