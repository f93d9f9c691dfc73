"""`python -m tools.figures`: README pictures from a tiny real run's TensorBoard event files."""

import subprocess
import sys

import pytest
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import QUICK, cli, fit_args, subprocess_env
from tools import figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_figures_from_a_fit_run_and_its_test_run(workdir, mnist_dir, capsys):
    cli(*fit_args(mnist_dir, "--trainer.max_epochs=2", "--trainer.limit_train_batches=1"))
    run = workdir / "lightning_logs" / "version_0"
    figures.main(["--run", str(run), "--out", "docs"])  # no test run yet: the curves alone
    assert sorted(p.name for p in (workdir / "docs").iterdir()) == ["training_curves.png"]
    assert "run `python -m mnist_lit test` first" in capsys.readouterr().out

    cli("test", *QUICK[1:])
    subprocess.run(
        [sys.executable, "-m", "tools.figures", "--run", str(run), "--out", "docs"],
        check=True,
        env=subprocess_env(),
    )
    docs = workdir / "docs"
    assert sorted(p.name for p in docs.iterdir()) == [
        "confusion_matrix.png",
        "mistakes.png",
        "training_curves.png",
    ]
    height, width, _ = imread(docs / "training_curves.png").shape
    assert (width, height) == (1000, 400)
    # The confusion matrix is the very image the test run logged to TensorBoard.
    test_events = EventAccumulator(str(workdir / "lightning_logs" / "version_0" / "test_0"))
    test_events.Reload()
    logged = test_events.Images("test/confusion_matrix")[-1].encoded_image_string
    assert logged.startswith(PNG_SIGNATURE) and (docs / "confusion_matrix.png").read_bytes() == logged


def test_curves_are_the_logged_values_per_epoch(workdir, mnist_dir):
    cli(*fit_args(mnist_dir, "--trainer.max_epochs=3", "--trainer.limit_train_batches=1"))
    events = figures.load_events(workdir / "lightning_logs" / "version_0")
    for tag in ("train/loss_epoch", "val/loss", "train/acc", "val/acc"):
        epochs, values = figures.per_epoch(events, tag)
        assert epochs == [0, 1, 2], tag  # numbered as the progress bar and checkpoint names number them
        assert values == [e.value for e in events.Scalars(tag)], tag


def test_a_resumed_run_is_one_curve_with_whole_epoch_ticks(workdir, mnist_dir):
    cli(*fit_args(mnist_dir, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1"))
    last = workdir / "lightning_logs/version_0/checkpoints/last.ckpt"
    cli(
        *fit_args(
            mnist_dir, "--trainer.max_epochs=3", "--trainer.limit_train_batches=1", f"--ckpt_path={last}"
        )
    )
    events = figures.load_events(workdir / "lightning_logs" / "version_0")
    assert figures.per_epoch(events, "val/acc")[0] == [0, 1, 2]
    figure = figures.training_curves(events, "resumed")
    for ax in figure.axes:
        ticks = [tick for tick in ax.get_xticks() if ax.get_xlim()[0] <= tick <= ax.get_xlim()[1]]
        assert ticks and all(float(tick).is_integer() for tick in ticks), ticks


def test_a_folder_without_events_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        figures.main(["--run", str(tmp_path), "--out", str(tmp_path / "docs")])
    assert str(exit_info.value.code) == f"tools.figures: error: no TensorBoard event files in {tmp_path}/"
