"""`engine-kit ckpt verify|inspect|repair` on valid, damaged, odd and foreign files and directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine_kit import create_trainer
from engine_kit.checkpoint import CheckpointDirectory
from engine_kit.cli import main
from handlers import CheckpointRotation
from tests.helpers import mlp, regression_batches


def saved_checkpoint(tmp_path: Path) -> Path:
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), F.mse_loss)
    CheckpointRotation(tmp_path, keep_last=1).attach(trainer)
    trainer.run(regression_batches(8, 4), max_epochs=2)
    return tmp_path / CheckpointDirectory(tmp_path, read_only=True).entries()[-1].name


def test_verify_accepts_a_valid_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = saved_checkpoint(tmp_path)
    assert main(["ckpt", "verify", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {path}")


def test_verify_rejects_a_flipped_byte_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = saved_checkpoint(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["ckpt", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("INVALID") and out.count("\n") == 1


def test_inspect_summarizes_file_and_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = saved_checkpoint(tmp_path)
    assert main(["ckpt", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for needle in ("optimizer step  4", "epoch 2", "AdamW", "fp32", "torch", "sections"):
        assert needle in out, needle
    assert main(["ckpt", "inspect", str(tmp_path)]) == 0
    assert "1 registered" in capsys.readouterr().out


def _directory_with(tmp_path: Path, payloads: list[dict]) -> list[Path]:
    with CheckpointDirectory(tmp_path) as ckpts:
        for step, payload in enumerate(payloads, start=1):
            ckpts.commit(ckpts.next_name(step), payload, step=step, epoch=0)
        return [tmp_path / entry.name for entry in ckpts.entries()]


@pytest.mark.parametrize(
    "payload",
    [
        {"meta": "not a dict", "model": [1, 2]},
        {"meta": {"created": "yesterday", "optimizer": "sgd", "metric": [1, 2], "epoch": {"x": 1}}},
        {"meta": {"created": float("inf"), "optimizer_steps": -1}, "model": {"w": torch.ones(2), "n": 3}, "stateful": "x"},
        {},
    ],
    ids=["meta-not-a-dict", "wrong-types", "odd-values", "empty"],
)
def test_inspect_never_tracebacks_on_odd_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str], payload: dict) -> None:
    (path,) = _directory_with(tmp_path, [payload])
    assert main(["ckpt", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"checkpoint {path}") and "record" in out and "Traceback" not in out


def test_inspect_and_verify_of_a_directory_check_every_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = _directory_with(tmp_path, [{"w": torch.ones(4)}, {"w": torch.zeros(4)}])
    data = bytearray(bad.read_bytes())
    data[40] ^= 0x01
    bad.write_bytes(bytes(data))
    for command in ("inspect", "verify"):
        assert main(["ckpt", command, str(tmp_path)]) == 1
        lines = capsys.readouterr().out.splitlines()
        assert "2 registered, 1 valid" in lines[0]
        assert [line for line in lines if good.name in line][0].endswith("valid")
        assert "INVALID: " in [line for line in lines if bad.name in line][0]


def test_repair_rebuilds_a_damaged_registry_and_says_what_it_did(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = _directory_with(tmp_path, [{"w": torch.ones(1)}, {"w": torch.ones(2)}])
    (tmp_path / "registry.json").write_text("garbage")
    (tmp_path / "stray.ekpt").write_bytes(b"not a checkpoint")
    assert main(["ckpt", "repair", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 checkpoint(s) indexed, no checkpoint file deleted" in out
    assert "rebuilt registry.json" in out and "not JSON" in out
    assert f"adopted verified files: ['{first.name}', '{second.name}']" in out
    assert "set aside (kept in place, not indexed) stray.ekpt" in out
    assert main(["ckpt", "repair", str(tmp_path)]) == 0
    assert "nothing to repair" in capsys.readouterr().out
    assert (tmp_path / "stray.ekpt").exists() and first.exists() and second.exists()
    assert main(["ckpt", "repair", str(first)]) == 1
    assert "is not a directory" in capsys.readouterr().out
