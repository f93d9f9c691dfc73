"""The training-time augmentations, on batches made up for the purpose."""

import torch

from mnist_lit.augment import randomly_warped, shifted, warp


def test_shifted_moves_each_image_by_whole_pixels_within_max_shift():
    images = torch.randint(1, 256, (64, 1, 28, 28), dtype=torch.uint8)  # no 0s: the padding is told apart
    moved = shifted(images, 2, torch.Generator().manual_seed(0))
    assert moved.shape == images.shape and moved.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(images)):
        matches = [
            (dy, dx) for dy in range(5) for dx in range(5)
            if torch.equal(padded[i, 0, dy : dy + 28, dx : dx + 28], moved[i, 0])
        ]  # fmt: skip
        assert len(matches) == 1, i  # exactly one window of the padded image: a whole-pixel move
        offsets.update(matches)
    assert len(offsets) > 5  # each image its own offset
    assert torch.equal(shifted(images, 0), images)


def test_warp_by_nothing_leaves_the_images_and_a_right_angle_turns_them():
    images = torch.rand(4, 1, 28, 28)
    none, right_angle = (torch.zeros(4), torch.full((4,), 90.0))
    torch.testing.assert_close(warp(images, none, torch.ones(4)), images)
    torch.testing.assert_close(warp(images, right_angle, torch.ones(4)), torch.rot90(images, -1, (2, 3)))


def test_warp_scales_about_the_centre():
    images = torch.zeros(1, 1, 28, 28)
    images[0, 0, 10:18, 10:18] = 1.0  # an 8x8 square in the middle
    larger = warp(images, torch.zeros(1), torch.tensor([1.5]))
    smaller = warp(images, torch.zeros(1), torch.tensor([0.5]))
    area = images.sum()
    assert larger.sum() > 2 * area and smaller.sum() < area / 2
    for scaled in (larger, smaller):  # still centred: symmetric about the middle
        torch.testing.assert_close(scaled, scaled.flip(2).flip(3))


def test_randomly_warped_draws_per_image_from_the_generator():
    images = torch.rand(1, 1, 28, 28).expand(16, 1, 28, 28).contiguous()  # 16 copies of one image
    first, again = (randomly_warped(images, 10.0, 0.1, torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(first, again)  # the same seed, the same batch: what exact resume relies on
    assert len({tuple(image.flatten().tolist()) for image in first}) == 16  # each copy its own warp
    other = randomly_warped(images, 10.0, 0.1, torch.Generator().manual_seed(6))
    assert not torch.equal(first, other)
    torch.testing.assert_close(randomly_warped(images, 0.0, 0.0), images)


def test_randomly_warped_stays_within_the_bounds():
    # A dot near a corner moves at most as far as the largest rotation and scale move it (give or take
    # what bilinear resampling does to a single pixel's centre of mass: a few hundredths of a pixel).
    images = torch.zeros(200, 1, 28, 28)
    images[:, 0, 4, 4] = 1.0
    warped = randomly_warped(images, 10.0, 0.1, torch.Generator().manual_seed(0))
    centre = 13.5
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    weights = warped[:, 0] / warped[:, 0].sum((1, 2), keepdim=True)
    row = (weights * rows).sum((1, 2)) - centre
    col = (weights * cols).sum((1, 2)) - centre
    radius = torch.hypot(row, col)
    angle = torch.rad2deg(
        torch.atan2(row, col) - torch.atan2(torch.tensor(4 - centre), torch.tensor(4 - centre))
    )
    start = torch.hypot(torch.tensor(4 - centre), torch.tensor(4 - centre))
    assert ((radius / start - 1).abs() <= 0.1 + 0.005).all()
    assert (angle.abs() <= 10 + 0.25).all()
    assert angle.abs().max() > 7 and (radius / start - 1).abs().max() > 0.07  # the bounds are reached
