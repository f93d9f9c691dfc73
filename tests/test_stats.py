"""`python -m mnist_lit stats`: the training set's pixel mean and std, the normalization constants."""

import numpy as np
import pytest

from tests.helpers import REAL_DATA, cli, synthetic_digits


def test_stats_of_tiny_data_match_numpy(mnist_dir, capsys):
    cli("stats", f"--data.data_dir={mnist_dir}", "--data.download=false")
    out = capsys.readouterr().out
    images, _ = synthetic_digits(600, seed=0)  # the fixture's training images
    pixels = images.astype(np.float64) / 255
    assert "600 images" in out
    assert f"mean {pixels.mean():.4f}  std {pixels.std(ddof=1):.4f}" in out


def test_stats_without_data_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli("stats", f"--data.data_dir={tmp_path}", "--data.download=false")
    assert str(exit_info.value.code).startswith(f"mnist_lit: error: MNIST not found in {tmp_path}/MNIST/raw/")


@pytest.mark.skipif(not (REAL_DATA / "MNIST" / "raw").is_dir(), reason="no ../shared/data")
def test_stats_of_real_mnist_are_the_seed_notebooks_constants(capsys):
    cli("stats", f"--data.data_dir={REAL_DATA}", "--data.download=false")
    out = capsys.readouterr().out
    assert "60000 images" in out and "mean 0.1307  std 0.3081" in out
