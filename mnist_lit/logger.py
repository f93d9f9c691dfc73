"""TensorBoard logs in a ``version_N`` folder that no other run can share; how run folders are numbered."""

import os
import re
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class RunLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger, but a run claims its ``<folder_prefix>_N`` folder atomically.

    Lightning picks ``max(existing N) + 1``: two runs started together in one folder both pick the
    same N and write their logs, checkpoints and config into it. Here the number is claimed with
    ``os.mkdir``, which exactly one process can win; the loser tries the next number. The claim is made
    when the run first needs its folder, not before. Only global rank 0 claims: under DDP the other
    ranks write nothing of their own there (Lightning hands them rank 0's checkpoint folder).

    Args:
        save_dir: folder that holds ``<name>/version_N/``.
        name: experiment folder under ``save_dir``.
        version: a fixed version (number or folder name) instead of the next free one.
        default_hp_metric: log a placeholder ``hp_metric``; off, since ``val/acc`` says it better.
        folder_prefix: run folders are ``<folder_prefix>_N``: ``version`` for training runs, the
            command's name for an evaluation run (the CLI files those under the run they evaluate).
        kwargs: passed on to TensorBoardLogger (and from there to ``SummaryWriter``).
    """

    def __init__(
        self,
        save_dir: str = ".",
        name: str = "lightning_logs",
        version: int | str | None = None,
        default_hp_metric: bool = False,
        folder_prefix: str = "version",
        **kwargs,
    ) -> None:
        # Absolute, as with Lightning's default logger (whose save_dir is the trainer's default os.getcwd()),
        # so that checkpoint paths printed and recorded do not depend on where they are read from.
        local = "://" not in str(save_dir)
        save_dir = os.path.abspath(save_dir) if local else save_dir
        super().__init__(save_dir, name=name, version=version, default_hp_metric=default_hp_metric, **kwargs)
        self.claimed: int | str | None = version
        self.folder_prefix = folder_prefix

    @property
    def version(self) -> int | str:
        if self.claimed is None:
            if rank_zero_only.rank != 0 or "://" in str(self.root_dir):  # remote folders: Lightning's rule
                return super().version
            number = claim_next_folder(Path(self.root_dir), self.folder_prefix)
            self.claimed = number if self.folder_prefix == "version" else f"{self.folder_prefix}_{number}"
        return self.claimed


def claim_next_folder(root: Path, prefix: str = "version") -> int:
    """Create ``root/<prefix>_N`` for the lowest N above every existing one that no other process took."""
    root.mkdir(parents=True, exist_ok=True)
    folders = run_folders(root, prefix)
    number = int(folders[0].name.rsplit("_", 1)[1]) + 1 if folders else 0
    while True:
        try:
            os.mkdir(root / f"{prefix}_{number}")
            return number
        except FileExistsError:  # another run got there first
            number += 1


def run_folders(log_root: Path, prefix: str = "version") -> list[Path]:
    """The ``<prefix>_N`` folders under ``log_root`` (training runs: ``version_N``), highest N first."""
    folders = [d for d in log_root.glob(f"{prefix}_*") if re.fullmatch(rf"{re.escape(prefix)}_\d+", d.name)]
    return sorted(folders, key=lambda d: int(d.name.rsplit("_", 1)[1]), reverse=True)
