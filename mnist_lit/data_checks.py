"""Why an MNIST folder cannot be used, in one sentence that names the file (imported once one cannot).

torchvision stays the IDX parser; when it chokes (an ``assert`` on the magic number, a ``view`` that
does not fit) its message names neither the file nor the fault. These checks read only the few header
bytes needed to say which file is broken and how, and say what is wrong with what torchvision parsed
when it is not MNIST (data.py's ``looks_like_mnist``): image size, matching counts, labels in 0-9.
"""

import math
import struct
from pathlib import Path

import torch

from mnist_lit.errors import first_line

UBYTE = 0x08  # IDX type code of unsigned bytes, the only one MNIST uses
IMAGE_SIZE = (28, 28)
NUM_LABELS = 10


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


def not_loaded(raw_folder: Path, images_file: Path, labels_file: Path, download: bool, err: Exception) -> str:
    """Why torchvision could not load a split's two files: they are missing, or one of them is broken."""
    if not (images_file.is_file() and labels_file.is_file()):
        from torchvision.datasets import MNIST

        files = ", ".join(Path(name).stem for name, _md5 in MNIST.resources)
        how = "the download failed" if download else "--data.download is false"
        return (
            f"MNIST not found in {raw_folder}/ and {how}: put {files} there, or point --data.data_dir at a "
            f"folder that has MNIST/raw/ ({err.__class__.__name__}: {first_line(err).rstrip(': ')})"
        )
    # torchvision only downloads missing files, so a broken one stays until it is replaced or deleted.
    fix = "replace it with the original MNIST file, or delete it to download it again"
    for path, ndim in ((images_file, 3), (labels_file, 1)):
        problem = idx_problem(path, ndim)
        if problem:
            return f"{path} {problem}; {fix}"
    return (
        f"torchvision could not read {images_file} or {labels_file} "
        f"({err.__class__.__name__}: {first_line(err)})"
    )
