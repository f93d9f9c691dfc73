"""Training-time augmentation, done on the device for a whole batch at once (``--data.max_rotation``,
``--data.max_scale``, ``--data.max_shift``).

The data module applies it to training batches only, with a generator seeded by the run's seed and the
global step, so a resumed run augments exactly as the uninterrupted one.
"""

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


def augmented(
    images: torch.Tensor, seed: int, max_rotation: float, max_scale: float, max_shift: int
) -> torch.Tensor:
    """A uint8 batch (N, 1, H, W) rotated and scaled (:func:`randomly_warped`, then float in [0, 1]) and
    shifted (:func:`shifted`) as the data module's ``max_*`` settings say, each draw from ``seed``."""
    generator = torch.Generator(images.device).manual_seed(seed)
    if max_rotation or max_scale:
        images = randomly_warped(
            TF.to_dtype(images, torch.float32, scale=True), max_rotation, max_scale, generator
        )
    if max_shift:
        images = shifted(images, max_shift, generator)
    return images


def warp(images: torch.Tensor, degrees: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Each image of a float batch (N, 1, H, W) rotated about its centre by its own angle (degrees,
    clockwise as the image is shown, rows going down) and scaled by its own factor (above 1: larger),
    resampled bilinearly in one ``grid_sample`` call; what moves in is 0 (MNIST's background before
    normalization).

    torchvision's ``RandomAffine`` and ``functional.affine`` apply one transform to a whole batch; here
    every image has its own, still in one call for the batch."""
    radians = torch.deg2rad(degrees)
    cos, sin = torch.cos(radians) / scales, torch.sin(radians) / scales
    zero = torch.zeros_like(cos)
    # affine_grid maps each output pixel to where it samples the input, in [-1, 1] coordinates: the
    # inverse of the rotation and scaling.
    theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def randomly_warped(
    images: torch.Tensor, max_rotation: float, max_scale: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """:func:`warp` with an angle uniform in ±``max_rotation`` degrees and a factor uniform in
    1 ± ``max_scale`` drawn for each image."""
    n = len(images)
    uniform = torch.rand(2, n, device=images.device, generator=generator) * 2 - 1  # in [-1, 1)
    return warp(images, uniform[0] * max_rotation, 1 + uniform[1] * max_scale)


def shifted(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of a batch (N, 1, H, W) moved by its own random offset of up to ``max_shift`` whole pixels
    down or up and left or right; what moves in is 0 (MNIST's background), what moves out is lost.

    Whole pixels, so no interpolation blurs the strokes; one gather on the images' device for the batch.
    """
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n, 1), device=images.device, generator=generator)
    rows = torch.arange(height, device=images.device) + offsets[0]  # (N, H): the rows of `padded` kept
    cols = torch.arange(width, device=images.device) + offsets[1]
    which = torch.arange(n, device=images.device)[:, None, None]
    return padded[which, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)
