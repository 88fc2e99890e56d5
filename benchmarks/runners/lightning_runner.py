"""Lightning's runners: ``Trainer.fit`` with the same recipe (needs ``pip install lightning``)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from models import ACCUMULATION, MAX_GRAD_NORM, Case
from lightning_env import import_lightning

L = import_lightning()  # the environment Lightning's import sets is given back only to these runners
ModelCheckpoint = L.pytorch.callbacks.ModelCheckpoint

PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


class Batches:
    """A list of batches as one iterable: Lightning reads a bare list as a list of loaders."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BenchModule(L.LightningModule):
    """The case's model as a LightningModule: the loss, and with ``full`` the logged losses and a scheduler."""

    def __init__(self, case: Case, full: bool) -> None:
        super().__init__()
        self.model, self.optimizer = case.fresh_model()
        self.case = case
        self.full = full
        self.saves = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.case.spec.loss_fn(self.model(x), y)
        if self.full:
            self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.case.spec.loss_fn(self.model(x), y), batch_size=len(y))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.saves += 1

    def configure_optimizers(self) -> Any:
        if not self.full:
            return self.optimizer
        scheduler = self.case.one_cycle(self.optimizer)
        return {"optimizer": self.optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_lightning(case: Case, workdir: Path, full: bool) -> Callable[[], dict[str, Any]]:
    """``Trainer(precision=…, accumulate_grad_batches=4, gradient_clip_val=1.0)``, no progress bar or summary.

    ``full`` adds OneCycleLR stepped per optimizer step (``interval="step"``),
    validation each epoch, ``self.log`` of every step's loss written by a
    ``TensorBoardLogger`` every ``log_every`` steps, and
    ``ModelCheckpoint(every_n_train_steps=checkpoint_every, save_top_k=1)``
    (Lightning's own save: serialized to memory, then written; no fsync).
    Lightning's own setup and teardown inside ``fit`` are timed too.
    """
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    module = BenchModule(case, full)
    schedule = case.schedule
    callbacks: list[Any] = []
    logger: Any = False
    if full:
        from lightning.pytorch.loggers import TensorBoardLogger

        callbacks.append(ModelCheckpoint(dirpath=workdir / "checkpoints", every_n_train_steps=schedule.checkpoint_every,
                                         save_top_k=1, save_on_train_epoch_end=False))
        logger = TensorBoardLogger(workdir, name="tb")
    trainer = L.Trainer(
        accelerator="gpu" if case.device.type == "cuda" else "cpu", devices=1,
        precision=PRECISIONS[case.precision], max_epochs=case.epochs,
        accumulate_grad_batches=ACCUMULATION, gradient_clip_val=MAX_GRAD_NORM,
        callbacks=callbacks, logger=logger, enable_checkpointing=full, log_every_n_steps=schedule.log_every,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1.0 if full else 0, default_root_dir=workdir,
    )

    def run() -> dict[str, Any]:
        with warnings.catch_warnings():
            # Lightning's advice ("few num_workers"...) is noise here; the CUDA sync-debug
            # warnings must still reach measure.count_host_syncs.
            warnings.filterwarnings("ignore", message=r"(?s)(?!.*synchroniz)")
            trainer.fit(module, train_dataloaders=Batches(case.train), val_dataloaders=Batches(case.val) if full else None)
        return {"optimizer_steps": trainer.global_step, "checkpoints": module.saves}

    return run
