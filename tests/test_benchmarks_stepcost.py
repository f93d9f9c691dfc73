"""The step-cost tool runs end to end on tiny data and prints every part of a step (no timing asserted)."""

import re

import pytest
import torch

from benchmarks.stepcost import main


def table_rows(lines: list[str]) -> dict[str, str]:
    """A printed Markdown table's rows, first cell -> second, its header and rule skipped."""
    return dict(re.fullmatch(r"\| (.+) \| (.+) \|", line).groups() for line in lines[2:])


def test_stepcost_prints_a_row_for_each_part_of_a_step(mnist_dir, capsys):
    main([f"--data-dir={mnist_dir}", "--steps=3", "--val-size=100"])
    steps, arithmetic = capsys.readouterr().out.split("\n\n")
    lines = steps.splitlines()
    assert lines[0].startswith("device: ") and "batch 100" in lines[0]
    rows = table_rows(lines[1:])
    assert list(rows) == [
        "loader",
        "network, eager",
        "network, one CUDA graph",
        "network, eager, NCHW instead of channels_last",
        "network, eager, bf16 autocast",
        "network, eager, NCHW, bf16 autocast",
        "network, eager, 1 CPU thread",
        "augmentation (configs/best.yaml)",
        "Lightning loop, empty step",
        "Lightning + network",
        "Lightning + MNISTClassifier",
    ]
    assert rows.pop("network, one CUDA graph") == "-"  # GPU only
    if torch.get_num_threads() == 1:  # nothing to compare one thread with
        assert rows.pop("network, eager, 1 CPU thread") == "-"
    assert all(float(ms) > 0 for ms in rows.values()), rows
    figures = table_rows(arithmetic.splitlines())
    # Per image: the convolutions and the classifier forward (5.68 MFLOP), their input and weight gradients
    # backward, except the first convolution's input gradient (the images need none).
    forward = 2 * (16 * 28 * 28 * 25 + 32 * 14 * 14 * 16 * 25 + 1568 * 10)
    backward = 2 * forward - 2 * 16 * 28 * 28 * 25
    assert figures["one step's forward and backward, MFLOP"] == f"{100 * (forward + backward) / 1e6:.1f}"
    assert float(figures["network, eager: GFLOP/s"]) > 0
    assert float(figures["1024x1024 matrix product: GFLOP/s"]) > 0
    assert figures["network, eager, share of the matrix product's rate"].endswith("%")


def test_stepcost_without_mnist_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([f"--data-dir={tmp_path}"])
    assert exit_.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"benchmarks.stepcost: error: --data-dir {tmp_path} has no MNIST/raw/ folder"
    )
