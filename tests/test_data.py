import subprocess
import sys

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from mnist_lit.data import MNIST_MEAN, MNIST_STD, MNISTDataModule
from mnist_lit.errors import UserError
from tests.helpers import QUICK, cli, fit_args, last_checkpoint_of_fit, subprocess_env, synthetic_digits


def make(mnist_dir, **kwargs) -> MNISTDataModule:
    dm = MNISTDataModule(data_dir=str(mnist_dir), download=False, **kwargs)
    dm.prepare_data()
    return dm


def test_split_sizes(mnist_dir):
    dm = make(mnist_dir, val_size=100)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (500, 100, 200)


def test_split_is_reproducible_and_disjoint(mnist_dir):
    first, again, other = (make(mnist_dir, val_size=100, split_seed=s) for s in (7, 7, 8))
    for dm in (first, again, other):
        dm.setup("fit")
    assert torch.equal(first.val_set.images, again.val_set.images)
    assert not torch.equal(first.val_set.images, other.val_set.images)
    # Every training image is used exactly once: train + val is a permutation of the 600 images.
    images, _ = synthetic_digits(600, seed=0)
    both = torch.cat([first.train_set.images, first.val_set.images]).flatten(1)
    assert sorted(map(bytes, both.numpy())) == sorted(map(bytes, images.reshape(600, -1).astype(np.uint8)))


def test_batches_are_uint8_until_normalized_on_device(mnist_dir):
    dm = make(mnist_dir, batch_size=32, val_size=100)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (32, 1, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (32,)
    normalized, same_labels = dm.on_after_batch_transfer([images, labels], 0)
    assert normalized.dtype == torch.float32 and normalized.shape == (32, 1, 28, 28)
    torch.testing.assert_close(normalized, (images.float() / 255 - MNIST_MEAN) / MNIST_STD)
    assert same_labels is labels


def test_normalization_constants_are_configurable(mnist_dir):
    dm = make(mnist_dir, mean=0.5, std=0.25)
    pixels = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    torch.testing.assert_close(dm.normalize(pixels).flatten(), torch.tensor([-2.0, 2.0]))


def test_missing_data_without_download_names_folder_and_files(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path / "nowhere"), download=False)
    dm.prepare_data()  # nothing to download: setup, on every process, says what is missing
    with pytest.raises(UserError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        assert name in message
    assert "--data.data_dir" in message


@pytest.mark.slow
def test_failed_download_is_one_clear_line(tmp_path):
    # The real download path, made to fail without touching the network: every HTTP(S) request goes
    # to a proxy on a closed local port.
    env = subprocess_env() | {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_lit", "fit", f"--data.data_dir={tmp_path / 'data'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("mnist_lit: error:")]
    assert len(error_lines) == 1
    assert "the download failed" in error_lines[0]
    assert str(tmp_path / "data" / "MNIST" / "raw") in error_lines[0]
    assert not error_lines[0].endswith(":)"), error_lines[0]  # torchvision's "Error downloading X:", no colon
    # A failed command leaves nothing behind: no empty data folder, no run folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def test_data_kept_on_the_device_trains_to_the_same_weights(tmp_path, mnist_dir):
    # On a CPU the device is host memory, so only the code path is exercised here; tests/test_gpu.py
    # checks that on a GPU the images live there and no step waits for a copy.
    weights = {}
    for flag in ("false", "true"):
        folder = tmp_path / flag
        folder.mkdir()
        checkpoint = last_checkpoint_of_fit(folder, *fit_args(mnist_dir, f"--data.on_device={flag}"))
        weights[flag] = checkpoint["state_dict"]
    host, device = weights["false"], weights["true"]
    assert host.keys() == device.keys()
    for name in host:
        assert torch.equal(host[name], device[name]), name


def test_data_on_device_refuses_loader_workers(workdir, mnist_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(*fit_args(mnist_dir, "--data.on_device=true", "--data.num_workers=2"))
    assert exit_.value.code != 0
    assert "--data.on_device" in str(exit_.value.code) and "--data.num_workers 0" in str(exit_.value.code)
    assert not (workdir / "lightning_logs").exists()


def test_evaluation_batches_are_their_own_size_and_change_no_result(workdir, mnist_dir, capsys):
    dm = make(mnist_dir, batch_size=32, eval_batch_size=64, val_size=100)
    dm.setup("fit")
    dm.setup("test")
    assert next(iter(dm.train_dataloader()))[0].shape[0] == 32
    assert [len(labels) for _, labels in dm.val_dataloader()] == [64, 36]
    assert [len(labels) for _, labels in dm.test_dataloader()] == [64, 64, 64, 8]
    cli(*fit_args(mnist_dir))
    capsys.readouterr()
    summaries = []
    for size in (1000, 7):
        cli("test", *QUICK[1:], f"--data.eval_batch_size={size}")
        out = capsys.readouterr().out
        summaries.append([line for line in out.splitlines() if line.startswith("test/acc")])
    assert summaries[0] == summaries[1] and len(summaries[0]) == 1


@pytest.mark.parametrize(
    "augmentation", [{"max_shift": 3}, {"max_rotation": 10.0, "max_scale": 0.1}], ids=["shift", "warp"]
)
def test_only_training_batches_are_augmented(mnist_dir, augmentation):
    dm = make(mnist_dir, **augmentation)
    dm.trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    images = torch.randint(1, 256, (16, 1, 28, 28), dtype=torch.uint8)
    labels = torch.zeros(16, dtype=torch.long)
    as_is = dm.normalize(images)
    dm.trainer.training = True
    train_images, train_labels = dm.on_after_batch_transfer([images, labels], 0)
    assert not torch.equal(train_images, as_is) and torch.equal(train_labels, labels)
    for stage in ("validating", "testing", "predicting"):
        setattr(dm.trainer, stage, True)
        assert torch.equal(dm.on_after_batch_transfer([images, labels], 0)[0], as_is), stage


def test_shifted_training_learns_other_weights(tmp_path, mnist_dir):
    weights = []
    for shift in (0, 2):
        folder = tmp_path / str(shift)
        folder.mkdir()
        checkpoint = last_checkpoint_of_fit(folder, *fit_args(mnist_dir, f"--data.max_shift={shift}"))
        weights.append(checkpoint["state_dict"]["net.features.0.weight"])
    assert not torch.equal(weights[0], weights[1])
