"""Writes what ``predict`` computed: one CSV row per image with the digit and the ten probabilities."""

import csv
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from mnist_lit.model import NUM_CLASSES


class PredictionWriter(BasePredictionWriter):
    """Saves predictions as CSV at the end of ``predict``.

    Args:
        output: CSV path; default ``predictions.csv`` in the run's log folder.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions, batch_indices
    ):
        path = Path(self.output) if self.output else Path(trainer.log_dir or ".") / "predictions.csv"
        if trainer.world_size > 1:  # each rank predicted its own shard
            path = path.with_stem(f"{path.stem}_rank{trainer.global_rank}")
        digits = torch.cat([batch["digit"] for batch in predictions]).tolist()
        probs = torch.cat([batch["probs"] for batch in predictions]).tolist()
        indices = [i for batch in batch_indices[0] for i in batch] if batch_indices else range(len(digits))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "digit", *(f"p{c}" for c in range(NUM_CLASSES))])
            for index, digit, row in zip(indices, digits, probs, strict=True):
                writer.writerow([index, digit, *(f"{p:.6f}" for p in row)])
        print(f"Predictions for {len(digits)} images written to {path}")
