"""Writes what ``predict`` computed: one CSV row per image with the digit and the ten probabilities."""

import csv
import os
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mnist_lit.distributed import gather_to_rank_zero
from mnist_lit.errors import UserError
from mnist_lit.images import shown
from mnist_lit.model import NUM_CLASSES


def print_table(rows: list[tuple[str, int, float]]) -> None:
    """file, predicted digit, its probability: one row per image."""
    table = Table("file", "digit", "probability")
    for file, digit, prob in rows:
        table.add_row(Text(file), str(digit), f"{prob:.4f}")  # Text: a name is not rich markup
    # Printed in full even when piped (rich would otherwise cut long paths to 80 columns).
    Console(width=None if sys.stdout.isatty() else 1000).print(table)


def taken(path: Path) -> str:
    """Why an existing ``--predictions.output`` is refused: never replaced, be it a file or a folder."""
    if path.is_dir():
        return f"--predictions.output {path} is a folder: give the name of a CSV file to write"
    return f"{path} already exists: choose another --predictions.output, or move the file away"


def write_whole(path: Path, rows: list[tuple[int, int, list[float]]], files: list[str]) -> None:
    """The CSV at ``path``, whole or not at all: written to a temporary file beside it, then renamed."""
    if path.exists():  # checked before predicting too; this covers a file that appeared meanwhile
        raise UserError(taken(path))
    with tempfile.NamedTemporaryFile(
        "w",
        dir=path.parent,
        prefix=f".{path.name}.",
        suffix=".tmp",
        delete=False,
        newline="",
        encoding="utf-8",
    ) as f:
        try:
            writer = csv.writer(f)
            file_column = ["file"] if files else []
            writer.writerow(["index", *file_column, "digit", *(f"p{c}" for c in range(NUM_CLASSES))])
            for index, digit, row in rows:
                file_cell = [files[index]] if files else []
                writer.writerow([index, *file_cell, digit, *(f"{p:.6f}" for p in row)])
            f.flush()
            os.fsync(f.fileno())
        except BaseException as err:
            f.close()
            os.unlink(f.name)
            if isinstance(err, OSError):  # a full disk or quota: the folder is left as it was
                reason = err.strerror or err
                raise UserError(f"could not write {path}: {reason}; nothing was written") from None
            raise
    # The temporary file is made 0600 (it is private until complete); the CSV is an ordinary file, as
    # open() would make it: the permissions the umask leaves.
    os.chmod(f.name, 0o666 & ~current_umask())
    os.replace(f.name, path)


def current_umask() -> int:
    """The process's umask, which can only be read by setting it (and is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class PredictionWriter(BasePredictionWriter):
    """Saves predictions as CSV at the end of ``predict``.

    Args:
        output: CSV path; default ``predictions.csv`` in the run's log folder.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Refuse before predicting anything, rather than after; an existing file is never replaced.
        if stage != "predict" or not self.output:
            return
        if Path(self.output).exists():
            raise UserError(taken(Path(self.output)))
        from mnist_lit.runs import check_writable

        check_writable(Path(self.output), "--predictions.output")

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions, batch_indices
    ):
        # trainer.log_dir is a collective under DDP: every rank asks, before only rank 0 writes.
        path = Path(self.output) if self.output else Path(trainer.log_dir or ".") / "predictions.csv"
        digits = torch.cat([batch["digit"] for batch in predictions]).tolist() if predictions else []
        probs = torch.cat([batch["probs"] for batch in predictions]).tolist() if predictions else []
        indices = [i for batch in batch_indices[0] for i in batch] if batch_indices else range(len(digits))
        # Under DDP each rank predicted its own share: rank 0 writes them all, in image order, to one file.
        shares = gather_to_rank_zero(trainer, list(zip(indices, digits, probs, strict=True)))
        if shares is None:
            return
        rows = sorted(row for share in shares for row in share)
        # The user's own images (--data.predict_path) are named by file, in the CSV and in a table; a name
        # that is not UTF-8 is written with \xNN escapes (images.shown).
        files = [shown(file) for file in getattr(trainer.datamodule, "predict_files", [])]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, rows, files)
        if files:
            print_table([(files[index], digit, row[digit]) for index, digit, row in rows])
        print(f"Predictions for {len(rows)} image{'' if len(rows) == 1 else 's'} written to {path}")
