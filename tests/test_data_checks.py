"""data_checks.py: what exactly is wrong with an IDX file, found from its bytes alone."""

import numpy as np
import pytest
import torch

from mnist_lit.data_checks import digits_problem, idx_problem
from tests.helpers import idx_bytes

IMAGES = np.zeros((3, 28, 28), dtype=np.uint8)


def write(tmp_path, data: bytes):
    path = tmp_path / "file-idx3-ubyte"
    path.write_bytes(data)
    return path


def test_a_well_formed_file_has_no_problem(tmp_path):
    assert idx_problem(write(tmp_path, idx_bytes(IMAGES)), ndim=3) is None


@pytest.mark.parametrize(
    ("data", "ndim", "expected"),
    [
        (b"", 3, "is empty (0 bytes)"),
        (idx_bytes(IMAGES)[:10], 3, "is truncated: 10 bytes, shorter than its own header"),
        (idx_bytes(IMAGES)[:-1], 3, "is truncated: its header (3 x 28 x 28) needs 2368 bytes, the file has"),
        (idx_bytes(IMAGES) + b"\0", 3, "is longer than its header says"),
        (idx_bytes(np.zeros(3)), 3, "has magic number 0x00000801, not 0x00000803"),
    ],
    ids=["empty", "short-header", "truncated", "too-long", "labels-for-images"],
)
def test_each_fault_is_named(tmp_path, data, ndim, expected):
    assert expected in idx_problem(write(tmp_path, data), ndim)


def test_digit_sets_that_cannot_be_mnist_are_named(tmp_path):
    images, labels = torch.zeros(3, 28, 28, dtype=torch.uint8), torch.tensor([0, 9, 3])
    assert digits_problem(tmp_path / "i", tmp_path / "l", images, labels) is None
    assert "holds 28x20 images" in digits_problem(tmp_path / "i", tmp_path / "l", images[:, :, :20], labels)
    assert "3 images but" in digits_problem(tmp_path / "i", tmp_path / "l", images, labels[:2])
    outside = digits_problem(tmp_path / "i", tmp_path / "l", images, torch.tensor([0, 10, -1]))
    assert "2 labels outside 0-9 (the first is 10, at index 1)" in outside
