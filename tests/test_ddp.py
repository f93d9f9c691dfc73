"""Lightning's own DDP, for real: two CPU processes started by the CLI."""

import math
import subprocess
import sys

import pytest
import torch

from mnist_lit.runs import load_checkpoint
from tests.helpers import QUICK, subprocess_env


def ddp_fit(folder, data_dir, *flags: str) -> subprocess.CompletedProcess:
    """`python -m mnist_lit fit` on two CPU processes, as a user would start it."""
    cmd = [
        sys.executable, "-m", "mnist_lit", "fit", f"--data.data_dir={data_dir}", "--data.val_size=100",
        *QUICK, "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", *flags,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=folder, env=subprocess_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_process_ddp_fit_on_cpu_shards_the_data(tmp_path, mnist_dir):
    proc = ddp_fit(tmp_path, mnist_dir, "--trainer.max_epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = load_checkpoint(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt")
    # 500 training images, 100 per batch: one process takes 5 steps per epoch, each of two ranks takes
    # ceil(250 / 100) = 3, because each rank sees its own half.
    assert last["global_step"] == 2 * math.ceil(250 / 100)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    # Only one run folder: the other rank did not claim a version of its own.
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]


@pytest.mark.slow
def test_divergence_under_ddp_stops_every_rank_with_one_clear_line(tmp_path, mnist_dir):
    # lr x 1e15 after every epoch: epoch 0 trains normally, epoch 1 sends the loss to NaN on both ranks.
    explode = ["--optimizer=Adam", "--lr_scheduler=ExponentialLR", "--lr_scheduler.gamma=1e15"]
    proc = ddp_fit(tmp_path, mnist_dir, "--trainer.max_epochs=3", *explode)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mnist_lit: error:")]
    assert errors and all("training diverged: the loss became nan at epoch 1" in line for line in errors)
    # Under DDP each look waits for every rank, so the loss is looked at on logging steps and epoch ends.
    assert all("(looked at every 50 steps)" in line for line in errors), errors
    kept = load_checkpoint(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt")
    assert kept["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())
