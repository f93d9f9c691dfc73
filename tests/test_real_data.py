"""A short run on a slice of the real MNIST in ../shared/data; skipped where it is absent."""

import pytest

from mnist_lit.runs import newest_run
from tests.helpers import QUICK, REAL_DATA, cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (REAL_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file(), reason="no ../shared/data"
    ),
]


def test_a_slice_of_real_mnist_clearly_learns(workdir, capsys):
    cli(
        "fit", f"--data.data_dir={REAL_DATA}", "--data.download=false", *QUICK,
        "--trainer.limit_train_batches=60", "--trainer.limit_val_batches=1",
    )  # fmt: skip
    _, val_acc = newest_run(workdir / "lightning_logs").best_checkpoint()
    assert val_acc > 0.90  # 6,000 images, one pass; chance is 0.10
    cli("test", *QUICK[1:], "--trainer.limit_test_batches=2")
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("test/acc "))
    assert float(line.split()[1].rstrip("%")) > 90.0
