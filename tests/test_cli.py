"""`engine-kit ckpt verify|inspect` on valid, damaged and foreign files."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine_kit import create_trainer
from engine_kit.checkpoint import CheckpointDirectory
from engine_kit.cli import main
from handlers import CheckpointRotation
from tests.helpers import mlp, regression_batches


def saved_checkpoint(tmp_path):
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), F.mse_loss)
    CheckpointRotation(tmp_path, keep_last=1).attach(trainer)
    trainer.run(regression_batches(8, 4), max_epochs=2)
    return tmp_path / CheckpointDirectory(tmp_path, read_only=True).entries()[-1].name


def test_verify_accepts_a_valid_checkpoint(tmp_path, capsys):
    path = saved_checkpoint(tmp_path)
    assert main(["ckpt", "verify", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {path}")


def test_verify_rejects_a_flipped_byte_with_one_line(tmp_path, capsys):
    path = saved_checkpoint(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["ckpt", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("INVALID") and out.count("\n") == 1


def test_inspect_summarizes_file_and_directory(tmp_path, capsys):
    path = saved_checkpoint(tmp_path)
    assert main(["ckpt", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for needle in ("optimizer step  4", "epoch 2", "AdamW", "fp32", "torch", "sections"):
        assert needle in out, needle
    assert main(["ckpt", "inspect", str(tmp_path)]) == 0
    assert "1 registered" in capsys.readouterr().out
