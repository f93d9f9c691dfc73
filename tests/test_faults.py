"""Interrupted and concurrent runs, for real: `python -m mnist_lit fit` subprocesses and signals."""

import signal
import subprocess
import sys
import time

import pytest
import torch

from mnist_lit.runs import load_checkpoint
from tests.helpers import QUICK, cli, last_checkpoint_of_fit, subprocess_env

# 500 training images in batches of 20: 25 steps an epoch, long enough to be interrupted inside one.
STEPS_PER_EPOCH = 25


def fit_flags(data_dir, epochs: int = 2) -> list[str]:
    return [
        "fit", f"--data.data_dir={data_dir}", "--data.val_size=100", "--data.batch_size=20",
        *QUICK[1:], f"--trainer.max_epochs={epochs}", "--seed_everything=3",
    ]  # fmt: skip


def start_fit(cwd, data_dir, epochs: int = 2, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mnist_lit", *fit_flags(data_dir, epochs), *extra]
    return subprocess.Popen(
        cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist_dir) -> dict:
    """last.ckpt of the same two epochs, run straight through."""
    return last_checkpoint_of_fit(tmp_path_factory.mktemp("straight"), *fit_flags(mnist_dir))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_epoch_saves_a_checkpoint_that_resumes_exactly(workdir, mnist_dir, uninterrupted, signum):
    marker = workdir / "epoch1-under-way"
    pace = ["--trainer.callbacks+=tests.pacing.Pace", f"--trainer.callbacks.marker={marker}"]
    proc = start_fit(workdir, mnist_dir, 2, *pace)
    last = workdir / "lightning_logs/version_0/checkpoints/last.ckpt"
    wait_for(marker, proc)  # 4 batches into epoch 1, which goes on for 21 more paced ones: signal now
    saved_after_epoch_0 = last.stat().st_mtime_ns
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("mnist_lit: error:")]
    assert len(errors) == 1 and "training stopped by a signal at epoch 1, step " in errors[0], stderr[-3000:]
    assert f"--ckpt_path={last}" in errors[0]
    # Only our line: not Lightning's "Received SIGTERM: 2" nor its blank "SIGTERMException ... message".
    assert stderr.strip().splitlines()[-1] == errors[0] and "SIGTERM" not in stderr, stderr[-3000:]
    stopped = load_checkpoint(last)
    assert last.stat().st_mtime_ns != saved_after_epoch_0, "the stop was not saved"
    assert STEPS_PER_EPOCH < stopped["global_step"] < 2 * STEPS_PER_EPOCH, "not stopped inside epoch 1"

    cli(*fit_flags(mnist_dir), f"--ckpt_path={last}")  # goes on in version_0
    with pytest.raises(SystemExit) as finished:  # again: the checkpoint has done its max_epochs already
        cli(*fit_flags(mnist_dir), f"--ckpt_path={last}")
    assert "has already trained 2 epoch(s), and --trainer.max_epochs is 2" in str(finished.value.code)
    assert "--trainer.max_epochs 7" in str(finished.value.code)
    assert sorted(p.name for p in (workdir / "lightning_logs").iterdir()) == ["version_0"]
    resumed = load_checkpoint(last)
    assert resumed["global_step"] == uninterrupted["global_step"] == 2 * STEPS_PER_EPOCH
    for key, value in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_folders(workdir, mnist_dir):
    procs = [start_fit(workdir, mnist_dir, epochs=1) for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    runs = sorted(p.name for p in (workdir / "lightning_logs").iterdir())
    assert runs == ["version_0", "version_1"]
    for run in runs:
        folder = workdir / "lightning_logs" / run
        assert (folder / "config.yaml").is_file() and list(folder.glob("events.out.tfevents.*"))
        assert load_checkpoint(folder / "checkpoints/last.ckpt")["global_step"] == STEPS_PER_EPOCH
    # Each run printed its own best checkpoint, in its own folder.
    printed = sorted(
        line for out, _ in outputs for line in out.splitlines() if line.startswith("Best checkpoint")
    )
    assert [f"/lightning_logs/version_{v}/" in line for v, line in enumerate(printed)] == [True, True]
