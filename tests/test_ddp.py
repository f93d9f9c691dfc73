"""Lightning's own DDP, for real: two CPU processes started by the CLI."""

import math
import subprocess
import sys

import pytest
import torch

from mnist_lit.runs import load_checkpoint
from tests.conftest import QUICK, subprocess_env


@pytest.mark.slow
def test_two_process_ddp_fit_on_cpu_shards_the_data(tmp_path, mnist_dir):
    cmd = [
        sys.executable, "-m", "mnist_lit", "fit", f"--data.data_dir={mnist_dir}", "--data.val_size=100",
        *QUICK, "--trainer.max_epochs=2",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = load_checkpoint(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt")
    # 500 training images, 100 per batch: one process takes 5 steps per epoch, each of two ranks takes
    # ceil(250 / 100) = 3, because each rank sees its own half.
    assert last["global_step"] == 2 * math.ceil(250 / 100)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    # Only one run folder: the other rank did not claim a version of its own.
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
