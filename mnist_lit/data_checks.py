"""Why an MNIST folder cannot be used, in one sentence that names the file.

torchvision stays the IDX parser; when it chokes (an ``assert`` on the magic number, a ``view`` that
does not fit) its message names neither the file nor the fault. These checks read only the few header
bytes needed to say which file is broken and how, and check what torchvision parsed for the things
it does not check itself: image size, matching counts, labels in 0-9.
"""

import math
import struct
from pathlib import Path

import torch

UBYTE = 0x08  # IDX type code of unsigned bytes, the only one MNIST uses
IMAGE_SIZE = (28, 28)
NUM_LABELS = 10


def idx_files(raw_folder: Path, train: bool) -> tuple[Path, Path]:
    """The images (3-d) and labels (1-d) IDX files of one split, as torchvision names them."""
    prefix = "train" if train else "t10k"
    return raw_folder / f"{prefix}-images-idx3-ubyte", raw_folder / f"{prefix}-labels-idx1-ubyte"


def idx_problem(path: Path, ndim: int) -> str | None:
    """What is wrong with an IDX file's header or length, in words; None when both look right."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with path.open("rb") as f:
        header = f.read(4 + 4 * ndim)
    expected_magic = bytes([0, 0, UBYTE, ndim])
    if len(header) >= 4 and header[:4] != expected_magic:
        return (
            f"has magic number 0x{header[:4].hex()}, not 0x{expected_magic.hex()} "
            f"(unsigned bytes, {ndim}-d): it is not an MNIST file of this kind"
        )
    if len(header) < 4 + 4 * ndim:
        return f"is truncated: {size} bytes, shorter than its own header"
    dims = struct.unpack(f">{ndim}I", header[4:])
    expected = len(header) + math.prod(dims)
    if size != expected:
        shape = " x ".join(map(str, dims))
        fault = "truncated" if size < expected else "longer than its header says"
        return f"is {fault}: its header ({shape}) needs {expected} bytes, the file has {size}"
    return None


def digits_problem(
    images_file: Path, labels_file: Path, images: torch.Tensor, labels: torch.Tensor
) -> str | None:
    """What makes parsed images (N, H, W) and labels (N,) unusable as MNIST; None when nothing does."""
    if tuple(images.shape[1:]) != IMAGE_SIZE:
        height, width = images.shape[1:]
        return f"{images_file} holds {height}x{width} images, not 28x28 MNIST digits"
    if len(images) == 0:
        return f"{images_file} holds no images"
    if len(images) != len(labels):
        return (
            f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels: "
            "the two files must come from the same MNIST release"
        )
    outside = ((labels < 0) | (labels >= NUM_LABELS)).nonzero().flatten()
    if len(outside):
        first = int(outside[0])
        return (
            f"{labels_file} has {len(outside)} labels outside 0-9 "
            f"(the first is {int(labels[first])}, at index {first})"
        )
    return None
