"""Training-time augmentation, done on the device for a whole batch at once (``--data.max_shift``).

The data module applies it to training batches only, with a generator seeded by the run's seed and the
global step, so a resumed run augments exactly as the uninterrupted one.
"""

import torch


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
