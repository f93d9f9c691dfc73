"""runs.py: which run is the newest, which checkpoint is its best, and safe checkpoint loading."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mnist_lit.errors import UserError
from mnist_lit.logger import run_folders
from mnist_lit.model import MNISTClassifier
from mnist_lit.runs import Run, check_checkpoint_fits, load_checkpoint, newest_run
from tests.helpers import QUICK, cli, error_of, fit_args, run_state, subprocess_env


def save_checkpoint(path, best_name: str | None = None, score: float | None = None, mtime: int = 0):
    """A file shaped like Lightning's: a state_dict, and ModelCheckpoint's state naming the best file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"best_model_path": best_name, "best_model_score": score}
    callbacks = {"ModelCheckpoint{'monitor': 'val/acc'}": state}
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callbacks": callbacks}, path)
    os.utime(path, (mtime, mtime))


def test_run_folders_are_numbered_runs_newest_first(tmp_path):
    for name in ("version_2", "version_10", "version_x", "test_0", "version_1"):
        (tmp_path / name).mkdir()
    assert [p.name for p in run_folders(tmp_path)] == ["version_10", "version_2", "version_1"]
    assert [p.name for p in run_folders(tmp_path, "test")] == ["test_0"]


def test_newest_run_is_the_highest_number_with_a_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "version_0/checkpoints/last.ckpt")
    (tmp_path / "version_1").mkdir()  # a run that failed before saving anything
    assert newest_run(tmp_path) == Run(tmp_path / "version_0")
    with pytest.raises(UserError, match="run `python -m mnist_lit fit` first"):
        newest_run(tmp_path / "nothing")


def test_best_checkpoint_is_the_one_model_checkpoint_recorded(tmp_path):
    run = Run(tmp_path / "version_0")
    folder = run.log_dir / "checkpoints"
    save_checkpoint(folder / "epoch00-val_acc0.9000.ckpt", mtime=1)
    # The newest file carries ModelCheckpoint's latest state, recorded with the path where it was written.
    save_checkpoint(folder / "last.ckpt", "/elsewhere/epoch00-val_acc0.9000.ckpt", 0.9, mtime=2)
    assert run.best_checkpoint() == (folder / "epoch00-val_acc0.9000.ckpt", pytest.approx(0.9))


def test_without_a_recorded_best_the_newest_checkpoint_counts(tmp_path):
    run = Run(tmp_path / "version_0")
    save_checkpoint(run.log_dir / "checkpoints/last.ckpt", mtime=1)
    assert run.best_checkpoint() == (run.log_dir / "checkpoints/last.ckpt", None)


def test_a_checkpoint_belongs_to_the_run_whose_checkpoints_folder_holds_it(tmp_path):
    assert Run.of_checkpoint(tmp_path / "version_3/checkpoints/last.ckpt") == Run(tmp_path / "version_3")
    assert Run.of_checkpoint(tmp_path / "downloads/model.ckpt") is None


def test_load_checkpoint_names_the_file_and_its_fault(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "gone.ckpt")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"notes\.ckpt is not a Lightning checkpoint"):
        load_checkpoint(tmp_path / "notes.ckpt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match=r"plain\.pt is not a Lightning checkpoint: it has no state_dict"):
        load_checkpoint(tmp_path / "plain.pt")


def test_check_checkpoint_fits_names_the_first_difference(tmp_path):
    model = MNISTClassifier()
    state = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    check_checkpoint_fits(state, tmp_path / "a.ckpt", model)  # the same model: no complaint
    state["state_dict"]["net.classifier.weight"] = torch.zeros(5, 1568)
    shapes = r"net\.classifier\.weight has shape \[5, 1568\] there but \[10, 1568\]"
    with pytest.raises(UserError, match=shapes):
        check_checkpoint_fits(state, tmp_path / "a.ckpt", model)
    del state["state_dict"]["net.classifier.weight"]
    with pytest.raises(UserError, match=r"it has no net\.classifier\.weight"):
        check_checkpoint_fits(state, tmp_path / "a.ckpt", model)


def test_an_unreadable_best_checkpoint_is_named_with_the_one_to_use_instead(tmp_path):
    run = Run(tmp_path / "version_0")
    folder = run.log_dir / "checkpoints"
    save_checkpoint(folder / "epoch00-val_acc0.9000.ckpt", mtime=1)
    save_checkpoint(folder / "last.ckpt", "epoch00-val_acc0.9000.ckpt", 0.9, mtime=2)
    best = folder / "epoch00-val_acc0.9000.ckpt"
    best.write_bytes(best.read_bytes()[:1000])  # cut short, as a full disk or an interrupted copy leaves it
    os.utime(best, (1, 1))
    with pytest.raises(UserError) as error:
        run.best_checkpoint()
    message = str(error.value)
    assert message.startswith(f"{best} is not a Lightning checkpoint") and "\n" not in message
    assert message.endswith(f"pass --ckpt_path={folder / 'last.ckpt'} to use last.ckpt instead")


def test_an_unreadable_newest_checkpoint_may_be_the_best_so_it_is_named(tmp_path):
    # The newest file carries the latest best; when it cannot be read, the best recorded before it is offered.
    run = Run(tmp_path / "version_0")
    folder = run.log_dir / "checkpoints"
    save_checkpoint(folder / "epoch00-val_acc0.9000.ckpt", mtime=1)
    save_checkpoint(folder / "last.ckpt", "epoch00-val_acc0.9000.ckpt", 0.9, mtime=2)
    (folder / "epoch01-val_acc0.9500.ckpt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(UserError) as error:
        run.best_checkpoint()
    message = str(error.value)
    assert message.startswith(f"{folder / 'epoch01-val_acc0.9500.ckpt'} is not a Lightning checkpoint")
    assert message.endswith(
        f"pass --ckpt_path={folder / 'epoch00-val_acc0.9000.ckpt'} to use epoch00-val_acc0.9000.ckpt instead"
    )


@pytest.mark.parametrize("command", ["test", "validate", "predict", "export", "serve"])
def test_a_bare_command_names_the_unreadable_best_checkpoint_and_the_alternative(trained_copy, command):
    folder = Path("lightning_logs/version_0/checkpoints")
    best = next(p for p in folder.glob("epoch*.ckpt"))
    mtime = best.stat().st_mtime
    best.write_bytes(best.read_bytes()[:150_000])
    os.utime(best, (mtime, mtime))  # still older than last.ckpt, as after a failed write
    message = error_of(command, *(QUICK[1:] if command in ("test", "validate", "predict") else []))
    assert message.startswith(f"mnist_lit: error: {best} is not a Lightning checkpoint"), message
    assert message.endswith(f"pass --ckpt_path={folder / 'last.ckpt'} to use last.ckpt instead"), message


def test_a_run_that_cannot_be_written_is_refused_before_resuming(workdir, mnist_dir):
    if os.geteuid() == 0 and shutil.which("unshare") is None:
        pytest.skip("as root, a read-only folder needs unshare and a mount of its own")
    cli(*fit_args(mnist_dir))
    run = workdir / "lightning_logs/version_0"
    before = run_state(run)
    resume = [
        sys.executable, "-m", "mnist_lit",
        *fit_args(mnist_dir, "--trainer.max_epochs=2", f"--ckpt_path={run}/checkpoints/last.ckpt"),
    ]  # fmt: skip
    if os.geteuid() == 0:  # root writes anywhere, but not on a read-only mount
        ro = (
            f"mount --bind -o ro {shlex.quote(str(run))} {shlex.quote(str(run))} && exec {shlex.join(resume)}"
        )
        resume = ["unshare", "--mount", "sh", "-c", ro]
    else:
        run.chmod(0o555)
    try:
        done = subprocess.run(resume, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    finally:
        run.chmod(0o755)
    if done.returncode != 0 and "mount" in done.stderr and "mnist_lit" not in done.stderr:
        pytest.skip(f"no read-only mount here: {done.stderr.strip()}")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip() == (
        f"mnist_lit: error: --ckpt_path {run}/checkpoints/last.ckpt: cannot resume its run: cannot write in "
        f"{run}: " + ("Read-only file system" if os.geteuid() == 0 else "Permission denied")
    )
    assert run_state(run) == before


def test_an_evaluation_from_another_folder_finds_the_runs_relative_data(workdir, mnist_dir):
    (workdir / "project").mkdir()
    shutil.copytree(mnist_dir, workdir / "project/data")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir / "project")
        cli(*fit_args(Path("data")))  # recorded in config.yaml as it was given: "data"
    run = workdir / "project/lightning_logs/version_0"
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["data_dir"] == "data"
    cli("test", *QUICK[1:], f"--ckpt_path={run}/checkpoints/last.ckpt")  # from workdir: no ./data here
    assert (run / "test_0").is_dir()
