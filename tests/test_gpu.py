"""On a CUDA GPU (skipped without one): the recipes train there, a GPU checkpoint serves CPU users, and a
training step never waits for the GPU: host/device syncs happen only on the steps the logger writes."""

import warnings
from collections import Counter

import lightning as L
import pytest
import torch

from mnist_lit.precision import precision_for
from tests.helpers import CONFIGS, QUICK, cli, fit_args, write_mnist

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = ["--trainer.accelerator=gpu", "--trainer.devices=1"]


class SyncWatch(L.Callback):
    """torch's sync debug mode set to "warn" from the second training batch to the start of the last.

    The window covers whole steps (data transfer, normalization, forward, backward, Adam, metrics, every
    callback's batch hooks), and none of the epoch's start or end, where syncing is expected. It also
    notes where the training images were kept.
    """

    steps = 0
    images_on: str = ""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == 1:
            torch.cuda.set_sync_debug_mode("warn")
        if batch_idx == trainer.num_training_batches - 1:
            torch.cuda.set_sync_debug_mode("default")
            SyncWatch.steps = batch_idx - 1
            SyncWatch.images_on = trainer.datamodule.train_set.images.device.type


@pytest.mark.parametrize("on_device", ["false", "true"])
def test_training_steps_do_not_sync_with_the_gpu(workdir, tmp_path_factory, on_device):
    data = write_mnist(tmp_path_factory.mktemp("mnist"), n_train=3100, n_test=100)  # 30 batches of 100
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli(
            *fit_args(data), *GPU, "--trainer.log_every_n_steps=10", f"--data.on_device={on_device}",
            "--trainer.callbacks+=tests.test_gpu.SyncWatch",
        )  # fmt: skip
    syncs = [w for w in caught if "synchronizing CUDA operation" in str(w.message)]
    assert SyncWatch.steps == 28
    assert SyncWatch.images_on == ("cuda" if on_device == "true" else "cpu")
    # The logger's steps (2 in the window) read the step loss, and StopOnDivergence looks at it then;
    # one sync per step (a .item(), a NaN check, a pageable copy) would be 28 or more.
    assert len(syncs) <= 8, Counter(f"{w.filename}:{w.lineno}" for w in syncs).most_common()


def test_a_gpu_checkpoint_tests_and_exports_on_the_cpu(workdir, mnist_dir, capsys):
    cli(*fit_args(mnist_dir), *GPU)
    assert "Best checkpoint:" in capsys.readouterr().out
    cli("test", *QUICK[1:], "--trainer.accelerator=cpu")
    assert "test/acc " in capsys.readouterr().out
    cli("export", "--format=onnx", "--output=model.onnx")
    assert (workdir / "model.onnx").stat().st_size > 100_000  # 29,034 float32 weights


@pytest.mark.parametrize("recipe", ["mnist.yaml", "fast.yaml", "gpu.yaml"])
def test_each_recipe_trains_on_the_gpu(workdir, mnist_dir, capsys, recipe):
    # fast.yaml chooses bf16-mixed on GPUs since Ampere, which run it natively (precision.py).
    cli(
        "fit",
        f"--config={CONFIGS / recipe}",
        f"--data.data_dir={mnist_dir}",
        "--data.val_size=100",
        *QUICK,
        *GPU,
    )
    out = capsys.readouterr().out
    assert "Best checkpoint:" in out
    assert (f"precision: {precision_for('gpu')[0]} (" in out) == (recipe != "mnist.yaml")
    cli("test", *QUICK[1:], *GPU)
    assert "test/acc " in capsys.readouterr().out
