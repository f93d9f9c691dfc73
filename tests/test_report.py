"""TensorBoard extras, read back from the event files: HPARAMS rows, test images, per-class accuracy,
learning rate and epoch time; the progress bar and the fit summary on the console."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.callbacks import RichProgressBar
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.helpers import cli, fit_args, synthetic_digits

# The trained run's own normalization (conftest.TRAINED_RUN).
TRAINED_MEAN, TRAINED_STD = 0.2, 0.4

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def events(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalar(accumulator: EventAccumulator, tag: str) -> list[float]:
    return [e.value for e in accumulator.Scalars(tag)]


def hparams_row(accumulator: EventAccumulator) -> tuple[dict, list[str]]:
    """The run's hyperparameters and the HPARAMS tab's metric columns, from the hparams plugin data."""
    content = accumulator.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    params = {
        name: getattr(value, value.WhichOneof("kind"))
        for name, value in start.session_start_info.hparams.items()
    }
    return params, [info.name.tag for info in experiment.experiment.metric_infos]


@pytest.fixture
def fit_and_test(trained_run, mnist_dir) -> tuple[Path, str]:
    """The session's trained run (conftest.TRAINED_RUN: 2 steps) and its bare `test`."""
    return trained_run / "lightning_logs", str(mnist_dir)


def test_fit_run_has_an_hparams_row_with_real_metric_columns(fit_and_test):
    logs, data_dir = fit_and_test
    fit = events(logs / "version_0")
    params, metrics = hparams_row(fit)
    assert params["command"] == "fit" and params["lr"] == pytest.approx(0.002)
    assert params["lr_schedule"] == "onecycle" and params["data_dir"] == data_dir and params["seed"] == 42
    assert params["max_epochs"] == 2
    assert metrics == ["val/acc_best", "test/acc"]
    # The columns are filled from the run's own scalars; no placeholder is logged.
    assert "hp_metric" not in fit.Tags()["scalars"] and len(scalar(fit, "val/acc_best")) == 2


def test_test_run_row_describes_the_checkpoint_it_tested(fit_and_test):
    logs, _ = fit_and_test
    test = events(logs / "version_0" / "test_0")
    params, metrics = hparams_row(test)
    checkpoint = Path(params["ckpt_path"])
    assert params["command"] == "test" and checkpoint.parent == Path("lightning_logs/version_0/checkpoints")
    assert params["lr"] == pytest.approx(0.002) and params["seed"] == 42 and params["max_epochs"] == 2
    assert metrics == ["val/acc_best", "test/acc"]
    # val/acc_best of the tested checkpoint (its file name carries val/acc), beside the test/acc it got.
    best_in_name = float(checkpoint.stem.split("val_acc")[1])
    assert scalar(test, "val/acc_best") == [pytest.approx(best_in_name, abs=1e-4)]
    assert len(scalar(test, "test/acc")) == 1


def test_test_logs_confusion_matrix_mistakes_and_per_class_accuracy(fit_and_test):
    logs, _ = fit_and_test
    test = events(logs / "version_0" / "test_0")
    for tag in ("test/confusion_matrix", "test/mistakes"):
        (image,) = test.Images(tag)
        assert image.encoded_image_string.startswith(PNG_SIGNATURE) and image.width > 300, tag
    per_class = np.array([scalar(test, f"test/acc_class/{digit}")[0] for digit in range(10)])
    (test_acc,) = scalar(test, "test/acc")
    assert test_acc < 1  # barely trained: there are mistakes to show
    # The per-class accuracies, weighted by how many test digits each class has, give test/acc back.
    _, labels = synthetic_digits(200, seed=1)  # the fixture's test set
    counts = np.bincount(labels, minlength=10)
    assert (per_class * counts).sum() / counts.sum() == pytest.approx(test_acc, abs=1e-6)


def picture(accumulator: EventAccumulator, tag: str) -> np.ndarray:
    """An image of the event file as gray levels (H, W), 0-255."""
    import io

    from PIL import Image

    (image,) = accumulator.Images(tag)
    return np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("L")).astype(float)


def tile(grid: np.ndarray, index: int, side: int, zoom: int, padding: int) -> np.ndarray:
    """Tile ``index`` of a make_grid picture (8 a row), sampled at the centre of each original pixel."""
    top = padding + (index // 8) * (side * zoom + padding)
    left = padding + (index % 8) * (side * zoom + padding)
    centres = np.arange(side) * zoom + zoom // 2
    return grid[top + centres[:, None], left + centres[None, :]]


def test_test_shows_the_first_layer_filters_and_the_first_test_images_feature_maps(fit_and_test):
    import torch

    from mnist_lit.lessons import block_maps
    from mnist_lit.model import MNISTClassifier
    from mnist_lit.runs import load_checkpoint

    logs, _ = fit_and_test
    test = events(logs / "version_0" / "test_0")
    run = logs / "version_0"
    tested = Path(hparams_row(test)[0]["ckpt_path"]).name
    model = MNISTClassifier()
    model.load_state_dict(load_checkpoint(run / "checkpoints" / tested)["state_dict"])
    model.eval()
    weights = model.net.features[0].weight.detach()[:, 0].numpy()
    filters = picture(test, "test/filters")
    assert filters.shape == (2 * 66 + 6, 8 * 66 + 6)  # 16 tiles of 5x5 weights, 12 px each, 2 rows of 8
    for index, kernel in enumerate(weights):  # each kernel scaled to its own range: black low, white high
        expected = (kernel - kernel.min()) / (kernel.max() - kernel.min()) * 255
        assert np.abs(tile(filters, index, 5, 12, 6) - expected).max() <= 1.5, index
    # The feature maps are those of the test set's first image, as the network computes them.
    images, _ = synthetic_digits(200, seed=1)
    first = (torch.tensor(images[:1, None], dtype=torch.float32) / 255 - TRAINED_MEAN) / TRAINED_STD
    assert picture(test, "test/feature_maps/input").shape == (28 * 4, 28 * 4)  # one image: no border
    layouts = {1: (16, 14, 6, 3), 2: (32, 7, 13, 6)}  # channels, side, zoom, padding
    computed = block_maps(model.net, first)
    for (block, (channels, side, zoom, padding)), maps in zip(layouts.items(), computed, strict=True):
        grid = picture(test, f"test/feature_maps/block{block}")
        rows = channels // 8
        assert grid.shape == (rows * (side * zoom + padding) + padding, 8 * (side * zoom + padding) + padding)
        expected = (maps[0] / maps.max() * 255).numpy()
        shown = np.stack([tile(grid, c, side, zoom, padding) for c in range(channels)])
        assert np.abs(shown - expected).max() <= 1.5, block
        assert shown.max() > 250 and shown.std() > 10  # not blank, not flat


def test_learning_rate_every_step_and_epoch_time(fit_and_test):
    logs, _ = fit_and_test
    fit = events(logs / "version_0")
    lr = scalar(fit, "lr-Adam")
    assert len(lr) == 2 and lr[0] != lr[1]  # one-cycle: a different rate at each of the 2 steps
    epoch_times = scalar(fit, "time/epoch_s")
    assert len(epoch_times) == 2 and all(t > 0 for t in epoch_times)


def test_a_progress_bar_of_the_users_own_is_the_only_one(workdir, mnist_dir, capsys):
    quiet_args = fit_args(mnist_dir, "--trainer.limit_train_batches=2")
    with_bar = [arg for arg in quiet_args if arg != "--trainer.enable_progress_bar=false"]
    cli(*with_bar, "--trainer.callbacks+=TQDMProgressBar")  # Lightning refuses two bars: this one, alone
    assert "━" not in capsys.readouterr().out


class BarSeen(L.Callback):
    """Records the progress bar that the trainer runs with."""

    bar = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        BarSeen.bar = trainer.progress_bar_callback


def test_rich_progress_bar_and_fit_summary(workdir, mnist_dir, capsys):
    quiet_args = fit_args(mnist_dir, "--trainer.limit_train_batches=2")
    with_bar = [arg for arg in quiet_args if arg != "--trainer.enable_progress_bar=false"]
    cli(*with_bar, "--trainer.callbacks+=tests.test_report.BarSeen")
    out = capsys.readouterr().out
    # Rich's bar, redrawn 10 times a second rather than Rich's 100 (each redraw takes the step's GIL).
    assert isinstance(BarSeen.bar, RichProgressBar) and BarSeen.bar.refresh_rate == 10
    # Rich's bar: epoch, step of the epoch, the loss and val/acc.
    assert "Epoch 0/0" in out and "━" in out and "2/2" in out
    assert "train/loss_step" in out and "val/acc" in out
    assert "v_num" not in out  # the run's number is its folder's; the bar showed it as 0.000
    assert "ProgressBar" not in (workdir / "lightning_logs/version_0/config.yaml").read_text()
    assert "fit summary" in out and "val/acc_best" in out and "time/epoch_s" in out

    cli(*quiet_args)  # quiet mode: no bar, still the summary
    out = capsys.readouterr().out
    assert "━" not in out and "Epoch 0/0" not in out
    assert "fit summary" in out
