"""Where training runs live and which checkpoint of a run counts: the one rule every command uses.

A run is a ``<log root>/version_N/`` folder that ``fit`` wrote: its ``config.yaml`` (saved by
LightningCLI) and ``checkpoints/`` (written by ModelCheckpoint). The newest run is the one with the
highest N that holds a checkpoint (``test``/``predict`` runs log to folders of their own, without
checkpoints, so they never shadow the run they evaluated). Its best checkpoint is the one that
ModelCheckpoint itself recorded as best.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mnist_lit.errors import UserError


@dataclass(frozen=True)
class Run:
    log_dir: Path

    @property
    def config_file(self) -> Path:
        return self.log_dir / "config.yaml"

    @property
    def checkpoints(self) -> list[Path]:
        """This run's checkpoints, oldest first."""
        return sorted((self.log_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)

    def settings(self, section: str) -> dict:
        """One section (``data``, ``model``) of the config this run was trained with."""
        if not self.config_file.is_file():
            return {}
        return (yaml.safe_load(self.config_file.read_text()) or {}).get(section) or {}

    def best_checkpoint(self) -> tuple[Path, float | None]:
        """The checkpoint ModelCheckpoint recorded as best, and its monitored score.

        The newest checkpoint file carries ModelCheckpoint's latest state; the best one is looked up by
        name in this run's folder, so a moved or copied log root still works.
        """
        newest = self.checkpoints[-1]
        state = load_checkpoint(newest)
        for callback_state in state.get("callbacks", {}).values():
            # Only a ModelCheckpoint with a monitor has a score; the one writing last.ckpt has none.
            if not isinstance(callback_state, dict) or callback_state.get("best_model_score") is None:
                continue
            best = newest.parent / Path(callback_state["best_model_path"]).name
            if best.is_file():
                return best, float(callback_state["best_model_score"])
        return newest, None


def newest_run(log_root: Path) -> Run:
    """The ``version_N`` folder under ``log_root`` with the highest N that holds a checkpoint."""
    runs = [Run(d) for d in log_root.glob("version_*") if re.fullmatch(r"version_\d+", d.name)]
    runs = [run for run in runs if run.checkpoints]
    if not runs:
        raise UserError(
            f"no trained run found under {log_root}/: run `python -m mnist_lit fit` first, "
            "or pass --ckpt_path to a checkpoint"
        )
    return max(runs, key=lambda run: int(run.log_dir.name.split("_")[1]))


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint's contents without executing any code stored in it (``weights_only``)."""
    return torch.load(path, map_location="cpu", weights_only=True)
