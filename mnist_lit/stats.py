"""``python -m mnist_lit stats``: where the normalization constants come from (the seed's cell 4)."""

import torch
from torchvision.transforms.v2 import functional as TF

from mnist_lit.data import MNISTDataModule


def pixel_mean_std(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std of uint8 images' pixels scaled to [0, 1] (float64: 47M pixels sum without drift)."""
    pixels = TF.to_dtype(images, torch.float64, scale=True)
    return pixels.mean().item(), pixels.std().item()


def stats(data_dir: str = "./data", download: bool = True) -> None:
    """Print the mean and std of the MNIST training set's pixels, scaled to [0, 1].

    These are the ``--data.mean`` and ``--data.std`` that training normalizes with.

    Args:
        data_dir: folder holding ``MNIST/raw/`` (torchvision's layout).
        download: fetch MNIST with torchvision when the files are missing.
    """
    data = MNISTDataModule(data_dir=data_dir, download=download)
    data.prepare_data()
    images = data.training_images()
    mean, std = pixel_mean_std(images)
    print(
        f"MNIST training set: {len(images)} images of {images.shape[-2]}x{images.shape[-1]} pixels in [0, 1]"
    )
    print(f"mean {mean:.4f}  std {std:.4f}")


def main(argv: list[str]) -> None:
    """``python -m mnist_lit stats ARGS`` (routed here by __main__.py)."""
    from mnist_lit.cli import run_function

    run_function(stats, argv, prefix="data")
