"""Where training runs live and which checkpoint of a run counts: the one rule every command uses.

A run is a ``<log root>/version_N/`` folder that ``fit`` wrote: its ``config.yaml`` (saved by
LightningCLI) and ``checkpoints/`` (written by ModelCheckpoint). The newest run is the one with the
highest N that holds a checkpoint. An evaluation of a run's checkpoint (``validate``, ``test``,
``predict``) logs inside that run, as ``version_N/test_M/``, so it never shadows the run it evaluated
and TensorBoard shows it under it. Its best checkpoint is the one that ModelCheckpoint itself recorded
as best.
"""

import functools
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mnist_lit.errors import UserError
from mnist_lit.logger import run_folders

# Where a .ckpt file may be below a folder given as --ckpt_path: a run's checkpoints, or a log root's runs'.
CHECKPOINT_PLACES = (
    "*.ckpt", "checkpoints/*.ckpt", "*/checkpoints/*.ckpt", "lightning_logs/*/checkpoints/*.ckpt"
)  # fmt: skip
NOT_A_CHECKPOINT = (
    "is not a Lightning checkpoint (a .ckpt file that fit writes): it is truncated or another kind of file"
)


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

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> "Run | None":
        """The run that wrote ``checkpoint`` (``<run>/checkpoints/<file>``), if it was a run's."""
        folder = Path(checkpoint).parent
        return cls(folder.parent) if folder.name == "checkpoints" else None

    @functools.cached_property
    def config(self) -> dict:
        """The config this run was trained with (LightningCLI's ``config.yaml``); empty if there is none."""
        if not self.config_file.is_file():
            return {}
        # libyaml's parser where PyYAML was built with it: the file lists every Trainer argument.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        return yaml.load(self.config_file.read_text(), Loader=loader) or {}

    def settings(self, section: str) -> dict:
        """One section (``data``, ``model``) of the config this run was trained with."""
        return self.config.get(section) or {}

    def seed(self) -> int | None:
        """The ``seed_everything`` this run was trained with, if it is known."""
        seed = self.config.get("seed_everything")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    def best_checkpoint(self) -> tuple[Path, float | None]:
        """The checkpoint ModelCheckpoint recorded as best, and its monitored score.

        The newest checkpoint file carries ModelCheckpoint's latest state; the best one is looked up by
        name in this run's folder, so a moved or copied log root still works. The best is read before it
        is returned: if it (or a newer file, which may be a newer best) cannot be read, UserError names
        it and the checkpoint to pass as ``--ckpt_path`` instead, since a run that fails has good files
        beside the bad one.
        """
        unreadable: UserError | None = None
        for newest in reversed(self.checkpoints):
            try:
                state = load_checkpoint(newest)
                break
            except UserError as err:
                unreadable = unreadable or err
        else:
            if unreadable is None:
                raise UserError(f"{self.log_dir} has no checkpoint: pass --ckpt_path to a checkpoint")
            raise UserError(f"{unreadable}; no other checkpoint of {self.log_dir} can be read either")
        best, score = newest, None
        for callback_state in state.get("callbacks", {}).values():
            # Only a ModelCheckpoint with a monitor has a score; the one writing last.ckpt has none.
            if not isinstance(callback_state, dict) or callback_state.get("best_model_score") is None:
                continue
            recorded = newest.parent / Path(callback_state["best_model_path"]).name
            if recorded.is_file():
                best, score = recorded, float(callback_state["best_model_score"])
                break
        if best != newest:
            try:
                load_checkpoint(best)
            except UserError as err:
                unreadable = err
                best, score = newest, None
        if unreadable is not None:
            raise UserError(
                f"{unreadable}; so the best checkpoint of {self.log_dir.name} is unknown or unreadable: "
                f"pass --ckpt_path={best} to use {best.name} instead"
            )
        return best, score


def newest_run(log_root: Path) -> Run:
    """The ``version_N`` folder under ``log_root`` with the highest N that holds a checkpoint."""
    run = next((run for run in map(Run, run_folders(log_root)) if run.checkpoints), None)
    if run is None:
        raise UserError(
            f"no trained run found under {log_root}/: run `python -m mnist_lit fit` first, "
            "or pass --ckpt_path to a checkpoint"
        )
    return run


def last_of_newest_run(log_root: Path, command: str) -> str:
    """What ``--ckpt_path last`` means: the newest run's last.ckpt, which a fit resumes in its run.

    (Lightning's own "last" looks in the folder of the run being started, where a new process has none,
    and trains from scratch.) A fit with no run to resume starts a new one, saying so: "null".
    """
    for run in map(Run, run_folders(log_root)):
        if (last := run.log_dir / "checkpoints" / "last.ckpt").is_file():
            if command != "fit" and rank_zero_only.rank == 0:
                print(f"{command}: using {last}")
            return str(last)
    if command != "fit":
        raise UserError(
            f"--ckpt_path last: no run under {log_root}/ has a last.ckpt: run `python -m mnist_lit fit` "
            "first, or pass --ckpt_path to a checkpoint"
        )
    if rank_zero_only.rank == 0:  # every DDP process parses the command line
        print(f"--ckpt_path last: no run under {log_root}/ has a last.ckpt to resume: starting a new run")
    return "null"


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint's contents without executing any code stored in it (``weights_only``).

    Raises UserError, naming the file, when it is missing, is not a checkpoint, is cut short, or holds
    objects other than tensors and plain data (whose unpickling could run code: refused unread).
    """
    if Path(path).is_dir():
        # Where fit puts them, for a run's folder or a log root: the newest as the example.
        found = [f for pattern in CHECKPOINT_PLACES for f in Path(path).glob(pattern) if f.is_file()]
        example = f", e.g. {max(found, key=lambda f: f.stat().st_mtime)}" if found else " (it holds none)"
        raise UserError(f"checkpoint {path} is a folder: give a .ckpt file{example}")
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # e.g. torch noting a TorchScript file: the refusal below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # garbage makes the (code-free) unpickler fail in any number of ways
        from mnist_lit.messages import checkpoint_refused

        raise UserError(checkpoint_refused(path, err, NOT_A_CHECKPOINT)) from err
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise UserError(f"{path} is not a Lightning checkpoint: it has no state_dict")
    return state


def check_checkpoint_fits(checkpoint: dict, path: Path, model: torch.nn.Module) -> None:
    """Raise UserError unless ``checkpoint``, loaded from ``path``, holds weights of ``model``'s shapes."""
    saved = {name: tuple(t.shape) for name, t in checkpoint["state_dict"].items()}
    wanted = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, shape in wanted.items():
        if name not in saved:
            raise UserError(f"{path} is a checkpoint of a different model: it has no {name}")
        if saved[name] != shape:
            raise UserError(
                f"{path} is a checkpoint of a different model: {name} has shape {list(saved[name])} there "
                f"but {list(shape)} here"
            )
    extra = sorted(set(saved) - set(wanted))
    if extra:
        raise UserError(f"{path} is a checkpoint of a different model: it has {extra[0]}, this one has not")


def evaluation_args(given: list[str], command: str, checkpoint: Path | None, log_root: Path) -> list[str]:
    """An evaluation's command line with what its run adds: a bare evaluation means the newest run's best
    checkpoint, and a run's checkpoint brings the data settings that run was trained with.

    The run's settings go before the user's own flags, so that any ``--data.*`` flag given still wins.
    (The model's settings come from the checkpoint itself: Lightning restores them after parsing.)
    """
    args = list(given)
    if checkpoint is None:
        checkpoint, score = newest_run(log_root).best_checkpoint()
        args.append(f"--ckpt_path={checkpoint}")
        if rank_zero_only.rank == 0:  # every DDP process parses the command line
            print(f"{command}: using {checkpoint}" + ("" if score is None else f" (val/acc {score:.4f})"))
    run = Run.of_checkpoint(checkpoint)
    if run is not None and run.settings("data"):
        args.insert(args.index(command) + 1, f"--data={json.dumps(run_data_settings(run))}")
    return args


def run_data_settings(run: Run) -> dict:
    """The data settings ``run`` was trained with, a relative ``data_dir`` made absolute where it names a
    folder beside the run's log root: relative to the folder that fit ran in, which an evaluation run
    from another folder would otherwise miss."""
    settings = dict(run.settings("data"))
    recorded = settings.get("data_dir")
    if isinstance(recorded, str) and not Path(recorded).is_absolute():
        beside_log_root = run.log_dir.parent.parent / recorded
        if beside_log_root.is_dir():
            settings["data_dir"] = str(beside_log_root.resolve())
    return settings


def log_into_run(logger_settings, checkpoint: Path, command: str) -> str | None:
    """Point the logger's settings (save_dir, name, version) into the run that ``checkpoint`` belongs to.

    An evaluation logs inside the run whose checkpoint it evaluates (``version_N/test_M``), so that the
    training runs stay the only ``version_N`` folders; a resumed ``fit`` goes on in the run it resumes, so
    that TensorBoard shows one run with one continuous curve. Returns "resumed", "inside", or None for a
    checkpoint that is not a run's.
    """
    run = Run.of_checkpoint(checkpoint)
    if run is None:
        return None
    if command == "fit":
        # Where its curves and checkpoints go on: else TensorBoard's writer thread fails later, in a
        # traceback of its own.
        for folder in (run.log_dir, Path(checkpoint).parent):
            if why := unwritable(folder):
                raise UserError(
                    f"--ckpt_path {checkpoint}: cannot resume its run: cannot write in {folder}: {why}"
                )
        logger_settings.save_dir, logger_settings.name = str(run.log_dir.parent), ""
        # version_N as the number N, which TensorBoardLogger files as version_N (and shows as v_num).
        number = run.log_dir.name.removeprefix("version_")
        logger_settings.version = int(number) if number.isdigit() else run.log_dir.name
        return "resumed"
    logger_settings.save_dir, logger_settings.name = str(run.log_dir), ""
    return "inside"


def check_writable(target: Path, flag: str) -> None:
    """Raise UserError, naming ``flag``, unless a new file can be written in ``target``'s folder (made if
    missing): checked before the work whose result it is to hold. An existing ``target`` (a folder
    included) is the caller's to refuse first."""
    if why := unwritable(target.parent):
        raise UserError(f"{flag} {target}: cannot write in {target.parent}: {why}")


def unwritable(folder: Path) -> str | None:
    """Why no new file can be written in ``folder`` (made if missing), or None when one can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        return err.strerror or str(err)
    return None
