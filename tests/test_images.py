"""`predict --data.predict_path`: the user's own image files, made MNIST-style, through the real CLI.

The fixture's synthetic digits are told apart by position, which MNIST-style centring removes; so the
model here is trained on caricatures of 0, 1 and 7 (a ring, a bar, a "┐") that keep their shape
through cropping, fitting and centring, and the test files are drawn in the same shapes.
"""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mnist_lit.images import mnist_style, read_grey
from tests.helpers import QUICK, cli, idx_bytes

WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def draw(label: int, size: tuple[int, int], ink=BLACK, paper=WHITE, stroke=0.12, box=(0.3, 0.15, 0.7, 0.85)):
    """An RGB picture of a 0 (ring), 1 (bar) or 7 ("┐") in ``box`` (fractions of the width and height)."""
    width, height = size
    image = Image.new("RGB", size, paper)
    pen = ImageDraw.Draw(image)
    left, top, right, bottom = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    thick = max(2, round(stroke * min(width, height)))
    if label == 0:
        pen.rectangle((left, top, right, bottom), outline=ink, width=thick)
    elif label == 1:
        middle = (left + right) / 2
        pen.rectangle((middle - thick / 2, top, middle + thick / 2, bottom), fill=ink)
    else:
        pen.rectangle((left, top, right, top + thick), fill=ink)
        pen.rectangle((right - thick, top, right, bottom), fill=ink)
    return image


def write_shapes_mnist(root: Path, n_train: int = 600, n_test: int = 100) -> Path:
    """An MNIST folder of 0/1/7 caricatures, varied in size, stroke and place, made MNIST-style."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.choice([0, 1, 7], size=n)
        images = []
        for label in labels:
            left, top = rng.uniform(0.05, 0.35), rng.uniform(0.05, 0.2)
            box = (left, top, left + rng.uniform(0.4, 0.6), top + rng.uniform(0.6, 0.75))
            size = tuple(int(s) for s in rng.integers(28, 90, size=2))
            picture = draw(int(label), size, stroke=rng.uniform(0.06, 0.15), box=box)
            images.append(mnist_style(torch.from_numpy(np.array(picture.convert("L")))[None])[0].numpy())
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(np.stack(images)))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return root


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    return write_shapes_mnist(tmp_path_factory.mktemp("shapes"))


# file name -> (picture, the digit drawn): both polarities, colour and grey, PNG and JPEG, many sizes.
def user_images() -> dict[str, tuple[Image.Image, int]]:
    return {
        "zero_black_on_white.png": (draw(0, (200, 260)), 0),
        "zero_white_on_black.jpg": (draw(0, (64, 64), ink=WHITE, paper=BLACK), 0),
        "one_grey_small.png": (draw(1, (40, 31)).convert("L"), 1),
        "one_blue_on_cream.jpeg": (draw(1, (300, 180), ink=(20, 40, 160), paper=(250, 240, 205)), 1),
        "seven_white_on_black_grey.png": (draw(7, (120, 90), ink=WHITE, paper=BLACK).convert("L"), 7),
        "seven_red_on_white.jpg": (draw(7, (500, 640), ink=(190, 20, 20)), 7),
    }


def test_own_images_are_predicted_and_a_corrupt_one_is_skipped(workdir, shapes_dir, capsys):
    cli("fit", f"--data.data_dir={shapes_dir}", "--data.val_size=100", "--data.batch_size=25", *QUICK)
    folder = workdir / "digits"
    folder.mkdir()
    expected = {}
    for name, (picture, digit) in user_images().items():
        picture.save(folder / name)
        expected[f"digits/{name}"] = digit
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    Image.new("L", (50, 50), 230).save(folder / "blank.png")  # a photo of empty paper
    (folder / "notes.txt").write_text("not an image, and not named like one")
    capsys.readouterr()

    cli("predict", "--data.predict_path=digits", "--predictions.output=mine.csv", *QUICK[1:])
    out, err = capsys.readouterr()
    skipped = [line for line in err.splitlines() if line.startswith("mnist_lit: skipped")]
    assert len(skipped) == 3, skipped
    assert "digits/notes.txt: not an image file (.png, .jpg" in skipped[0]  # said, not silently left out
    assert "digits/blank.png: no digit found" in skipped[1]
    assert "digits/broken.png" in skipped[2] and "cannot identify image" in skipped[2]

    with open(workdir / "mine.csv") as f:
        rows = {row["file"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == sorted(expected)
    predicted = {file: int(row["digit"]) for file, row in rows.items()}
    assert predicted == expected
    for file, row in rows.items():  # the table: file, digit, that digit's probability
        probability = float(row[f"p{row['digit']}"])
        table_row = ["│", file, "│", row["digit"], "│", f"{probability:.4f}", "│"]
        assert table_row in [line.split() for line in out.splitlines()], file

    # Nothing readable at all: one error naming the path, and a failed exit.
    with pytest.raises(SystemExit) as exit_info:
        cli("predict", "--data.predict_path=digits/broken.png", *QUICK[1:])
    assert str(exit_info.value.code).startswith("mnist_lit: error: none of the 1 file(s)")
    assert "digits/broken.png" in str(exit_info.value.code)
    # The predict run that worked is filed under the run it used; the failed one left no folder.
    assert sorted(p.name for p in (workdir / "lightning_logs/version_0").glob("predict_*")) == ["predict_0"]


def test_mnist_style_fits_20x20_centres_by_mass_and_ignores_polarity_and_size(tmp_path):
    dark_on_light = tmp_path / "a.png"
    light_on_dark = tmp_path / "b.png"
    draw(7, (300, 400)).save(dark_on_light)
    draw(7, (75, 100), ink=(250, 250, 250), paper=(10, 10, 10)).save(light_on_dark)
    first, second = (mnist_style(read_grey(path)) for path in (dark_on_light, light_on_dark))
    assert first.shape == (1, 28, 28) and first.dtype == torch.uint8
    assert int(first.max()) == 255 and first[0, 0, 0] == 0  # bright digit on black, as in MNIST
    rows, cols = first[0].nonzero(as_tuple=True)
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 < 20  # taller than wide
    mass = first[0].float()
    centre = [
        (mass.sum(1) @ torch.arange(28.0)) / mass.sum(),
        (mass.sum(0) @ torch.arange(28.0)) / mass.sum(),
    ]
    assert all(abs(c - 13.5) <= 0.5 for c in centre)
    # The same digit whatever its paper and size, give or take a pixel's shift from rounding.
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    distance = min((first.float() - second.float().roll(s, dims=(1, 2))).abs().mean() for s in shifts)
    assert distance < 5
