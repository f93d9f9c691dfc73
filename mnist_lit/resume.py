"""What a resumed ``fit`` must agree with: the epochs its checkpoint holds, its one-cycle schedule, and
the settings it was trained with. Imported only when a fit resumes."""

from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, WeightAveraging

from mnist_lit.errors import UserError
from mnist_lit.runs import Run


def epochs_completed(checkpoint: dict) -> int:
    """How many whole epochs of training a Lightning checkpoint holds (a mid-epoch save: those before it).

    An epoch's checkpoints are written at its end, once its training counts as processed but before
    Lightning marks it completed: so "processed" is what a resumed run goes on from.
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    return int(progress.get("current", {}).get("processed", 0))


def one_cycle_epochs(checkpoint: dict, path: Path) -> int | None:
    """The epochs over which the one-cycle learning rate of ``checkpoint`` (loaded from ``path``) was
    planned, if it has one.

    OneCycleLR fixes its length in steps when it is made and anneals the rate to about 0 at the end:
    a resumed run cannot go past it (torch refuses the next step). Its length in epochs follows from the
    steps it took per batch trained so far and the batches of a whole epoch; before the first epoch has
    ended, from the epochs its run was started with.
    """
    schedule = next((s for s in checkpoint.get("lr_schedulers") or [] if "total_steps" in s), None)
    if schedule is None:
        return None
    batches = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    trained, this_epoch = batches.get("total", {}).get("ready", 0), batches.get("current", {}).get("ready", 0)
    done, steps = epochs_completed(checkpoint), schedule.get("last_epoch", 0)
    whole_epochs = trained if batches.get("is_last_batch") else trained - this_epoch
    if done and whole_epochs and steps:
        steps_per_epoch = steps / trained * whole_epochs / done
        return round(schedule["total_steps"] / steps_per_epoch)
    # Stopped inside its first epoch, whose length is not known yet: the epochs its run was started with.
    run = Run.of_checkpoint(path)
    planned = (run.settings("trainer") if run else {}).get("max_epochs")
    return planned if isinstance(planned, int) and planned > 0 else None


def check_resumable(checkpoint: dict, path: Path, max_epochs: int | None) -> None:
    """Raise UserError when resuming ``checkpoint`` would train nothing (it has its epochs already), or
    more epochs than its one-cycle schedule has."""
    done, planned = epochs_completed(checkpoint), one_cycle_epochs(checkpoint, path)
    new_fit = "start a new fit with the --trainer.max_epochs you want"
    if max_epochs is not None and max_epochs >= 0 and done >= max_epochs:
        if planned is not None and done >= planned:
            further = f"its one-cycle learning rate ended with them: to train longer, {new_fit}"
        elif planned is not None:  # its schedule has epochs left: up to the planned ones
            further = f"to train on to the end of its one-cycle schedule, pass --trainer.max_epochs {planned}"
        else:
            further = f"to train further, pass a --trainer.max_epochs above {done}"
        raise UserError(
            f"{path} has already trained {done} epoch(s), and --trainer.max_epochs is {max_epochs}: there is "
            f"nothing left to train; {further}"
        )
    if planned is not None and (max_epochs is None or max_epochs < 0 or max_epochs > planned):
        raise UserError(
            f"{path} was trained with a one-cycle learning rate planned over {planned} epochs, which ends "
            f"there: it cannot go on to --trainer.max_epochs {max_epochs}; resume it with "
            f"--trainer.max_epochs {planned} or less, or {new_fit}"
        )


# What a resumed fit may set afresh: where the data is and how fast it is read or computed, none of which
# changes what is trained. Any other model or data setting must be the one the checkpoint was trained with.
MAY_CHANGE_ON_RESUME = frozenset(
    {"data_dir", "num_workers", "download", "on_device", "eval_batch_size", "predict_path", "max_pixels",
     "channels_last", "compile"}
)  # fmt: skip


def check_same_training(checkpoint: dict, path: Path, given: Namespace, callbacks: list[Callback]) -> None:
    """Raise UserError unless resuming ``checkpoint`` (loaded from ``path``) with the settings ``given`` (as
    parsed) and the trainer's ``callbacks`` goes on training as it was trained: the same model and data
    settings, seed, and weight averaging or none.

    Lightning would take the model's settings from the checkpoint and everything else from the command
    line, and a run resumed with another recipe would silently train on under a mix of the two.
    """
    recorded = {
        "model": checkpoint.get("hyper_parameters") or {},
        "data": checkpoint.get("datamodule_hyper_parameters") or {},
    }
    differ = []
    for section, saved in recorded.items():
        for name, value in saved.items():
            now = given[section].as_dict().get(name, value)
            if not name.startswith("_") and name not in MAY_CHANGE_ON_RESUME and now != value:
                differ.append(f"--{section}.{name} {value} there, {now} here")
    run = Run.of_checkpoint(path)
    seed = run.seed() if run is not None else None
    if seed is not None and given.seed_everything != seed:
        differ.append(f"--seed_everything {seed} there, {given.seed_everything} here")
    averaging = any(isinstance(callback, WeightAveraging) for callback in callbacks)
    if "current_model_state" in checkpoint and not averaging:  # what Lightning's WeightAveraging saves
        differ.append("weight averaging there (a WeightAveraging callback, as in best.yaml), none here")
    elif averaging and "current_model_state" not in checkpoint:
        differ.append("no weight averaging there, a WeightAveraging callback here")
    if differ:
        recorded_in = run is not None and run.config_file.is_file()
        settings = f" (its settings: {run.config_file})" if recorded_in else ""
        raise UserError(
            f"--ckpt_path {path} was trained with other settings than these: {'; '.join(differ)}: resume it "
            f"with the command that started it{settings} plus --ckpt_path, or start a new fit"
        )
