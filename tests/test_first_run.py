"""A new user's first minutes, as they run them: `fit`, `test`, `predict` with the default flags
(progress bar and model summary on), each in its own process, printing only what the user asked for."""

import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

from tests.helpers import CONFIGS, subprocess_env

# Lines that a user did not ask for: Lightning's info lines and product tip, a FLOP count of 0 (no
# example input), warnings and tracebacks.
NOISE = ("Seed set", "GPU available", "TPU available", "Tip:", "litlogger", "`Trainer.fit` stopped",
         "Total FLOPs: 0", "Warning", "warn", "Traceback", "SIGTERM")  # fmt: skip


def run(cwd, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_lit", *args],
        cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = [line for line in (proc.stdout + proc.stderr).splitlines() if any(n in line for n in NOISE)]
    assert not noise, noise
    return proc


@pytest.mark.slow
def test_fit_test_predict_with_default_flags_print_only_what_was_asked(tmp_path, mnist_dir):
    # Batches of 10: 50 steps, Lightning's default logging interval, as real MNIST has more than enough.
    fit = run(tmp_path, "fit", f"--data.data_dir={mnist_dir}", "--data.val_size=100", "--data.batch_size=10",
              "--trainer.max_epochs=1")  # fmt: skip
    assert "Total FLOPs" in fit.stdout and "fit summary" in fit.stdout and "Best checkpoint:" in fit.stdout
    assert fit.stderr == ""

    test = run(tmp_path, "test")
    assert "test: using lightning_logs/version_0/checkpoints/" in test.stdout
    assert "test/acc " in test.stdout.splitlines()[-1]

    last = run(tmp_path, "test", "--ckpt_path=last")  # the newest run's last.ckpt, not its best
    assert "test: using lightning_logs/version_0/checkpoints/last.ckpt" in last.stdout
    assert "test/acc " in last.stdout.splitlines()[-1]

    validate = run(tmp_path, "validate")
    assert validate.stdout.splitlines()[-1].startswith("val/acc ")

    image = Image.new("L", (60, 60), 255)
    ImageDraw.Draw(image).line([(30, 10), (30, 50)], fill=0, width=6)
    image.save(tmp_path / "one.png")
    predict = run(tmp_path, "predict", "--data.predict_path=one.png")
    assert "one.png" in predict.stdout and "Predictions for 1 image written to" in predict.stdout
    # Each evaluation is filed under the run it evaluated; the training runs stay the only version_N.
    logs = tmp_path / "lightning_logs"
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]
    assert {p.name for p in (logs / "version_0").iterdir()} >= {"test_0", "test_1", "validate_0", "predict_0"}


@pytest.mark.slow
def test_a_bf16_fit_prints_only_what_was_asked(tmp_path, mnist_dir):
    # The model summary warns that it counts a bf16-mixed model's size at 32 bits, which is what its
    # weights are: noise, filtered (__main__.QUIET). Forced here, as recipes pick bf16 only where native.
    fit = run(tmp_path, "fit", f"--config={CONFIGS / 'fast.yaml'}", f"--data.data_dir={mnist_dir}",
              "--data.val_size=100", "--trainer.precision=bf16-mixed", "--trainer.max_epochs=1",
              "--trainer.limit_train_batches=5", "--trainer.log_every_n_steps=2")  # fmt: skip
    assert "Total estimated model params size (MB)" in fit.stdout and fit.stderr == ""
