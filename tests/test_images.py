"""`predict --data.predict_path`: the user's own image files, made MNIST-style, through the real CLI.

The fixture's synthetic digits are told apart by position, which MNIST-style centring removes; so the
model here is trained on caricatures of 0, 1 and 7 (a ring, a bar, a "┐") that keep their shape
through cropping, fitting and centring, and the test files are drawn in the same shapes.
"""

import csv
import io
import os
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mnist_lit.images import (
    UNREADABLE,
    TooManyPixels,
    load_digits,
    mnist_digit,
    mnist_style,
    read_grey,
    shown,
)
from tests.helpers import QUICK, cli, error_of, idx_bytes

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
    (workdir / "unreadable").mkdir()  # a folder: its image files are counted, its other entries skipped
    (workdir / "unreadable/notes.txt").write_text("not a picture")
    (workdir / "unreadable/empty.png").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        cli("predict", "--data.predict_path=unreadable", *QUICK[1:])
    message = "mnist_lit: error: none of the 1 image file(s) in --data.predict_path unreadable could be read"
    assert str(exit_info.value.code).startswith(message), exit_info.value.code
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


# --- Hostile and large files: the pixel budget, truncation, JPEG draft decoding -------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 13000, height: int = 13000) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: about 20 KB that decode to 169 MB and more."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then 8 pixels a byte
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int) -> bytes:
    """A whole small JPEG whose frame header claims width x height: its scan ends long before the pixels
    do (what a cut file with its end marker put back looks like; libjpeg would paint the rest grey)."""
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.index(b"\xff\xc0")  # SOF0: length (2 bytes), precision (1), then height and width
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def peak_rss_growth(action) -> tuple[float, float]:
    """Seconds that ``action()`` took and how far it raised this process's peak memory (MB), Linux only."""
    status = Path("/proc/self/status")
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc to measure memory")

    def field(name: str) -> int:
        line = next(line for line in status.read_text().splitlines() if line.startswith(name))
        return int(line.split()[1]) * 1024

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak, to the current RSS
    before = field("VmRSS")
    start = time.perf_counter()
    action()
    return time.perf_counter() - start, (field("VmHWM") - before) / 2**20


def distance(first: torch.Tensor, second: torch.Tensor) -> float:
    """Mean pixel difference of two digits, give or take a pixel's shift from rounding."""
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return min(float((first.float() - second.float().roll(s, dims=(1, 2))).abs().mean()) for s in shifts)


def refusal(data: bytes, **kwargs) -> Exception:
    """What mnist_digit raises for ``data``; the test fails if it decodes."""
    try:
        mnist_digit(data, **kwargs)
    except UNREADABLE as err:
        return err
    raise AssertionError("decoded, not refused")


def test_a_png_declaring_13000x13000_is_refused_from_its_header_fast_and_without_a_warning():
    bomb = png_bomb()
    assert len(bomb) < 25_000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TooManyPixels, match=r"13000x13000 pixels \(169 megapixels\), more than the 50 "):
            mnist_digit(bomb)
    assert caught == []  # no DecompressionBombWarning, nor any other
    seconds, grown_mb = peak_rss_growth(lambda: refusal(bomb))
    assert seconds < 0.5 and grown_mb < 50, (seconds, grown_mb)  # decoding it takes seconds and 1-3 GB
    # The budget is a parameter: a smaller one refuses a small image, a larger one lets the bomb decode.
    with pytest.raises(TooManyPixels, match=r"\(400 pixels\), more than the 100 pixels allowed"):
        mnist_digit(png_bomb(20, 20), max_pixels=100)


def test_a_budget_is_said_in_pixels_under_a_megapixel_never_as_0_0_megapixels():
    for max_pixels, size, words in (
        (5000, (84, 84), "84x84 pixels (7056 pixels), more than the 5000 pixels allowed"),
        (1_500_000, (1300, 1200), "1300x1200 pixels (1.56 megapixels), more than the 1.5 megapixels allowed"),
        (1, (2, 1), "2x1 pixels (2 pixels), more than the 1 pixel allowed"),
        (1_000_000, (1000, 1001), "1000x1001 pixels (1.001 megapixels), more than the 1 megapixel allowed"),
    ):
        message = str(refusal(png_bomb(*size), max_pixels=max_pixels))
        assert words in message and "0.0" not in message, message


@pytest.mark.parametrize(
    ("size", "words"),
    [((13000, 13000), "13000x13000 pixels (169 megapixels), more than"), ((6000, 4000), "truncated")],
)
def test_a_jpeg_shorter_than_its_declared_size_is_refused_fast(size, words):
    data = jpeg_declaring(*size)
    assert len(data) < 500
    seconds, grown_mb = peak_rss_growth(lambda: refusal(data))
    assert words in str(refusal(data))
    assert seconds < 0.5 and grown_mb < 50, (seconds, grown_mb)  # libjpeg: 0.4-7 s, 0.1-2.4 GB


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_a_cut_file_is_refused_not_half_decoded(format, tmp_path):
    picture = draw(7, (400, 300))
    buffer = io.BytesIO()
    picture.save(buffer, format)
    cut = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    with pytest.raises(OSError, match="truncated"):
        mnist_digit(cut)
    (tmp_path / f"cut.{format.lower()}").write_bytes(cut)
    with pytest.raises(OSError, match="truncated"):
        mnist_digit(tmp_path / f"cut.{format.lower()}")


def test_a_4000x3000_photo_is_predicted_like_the_same_picture_smaller_and_cheaply():
    big, small = draw(7, (4000, 3000)), draw(7, (400, 300))
    files = {}
    for name, picture in (("big", big), ("small", small)):
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=90)
        files[name] = buffer.getvalue()
    digits = {}
    seconds, grown_mb = peak_rss_growth(lambda: digits.update(big=mnist_digit(files["big"])))
    digits["small"] = mnist_digit(files["small"])
    assert digits["big"].shape == (1, 28, 28) and int(digits["big"].max()) == 255
    assert distance(digits["big"], digits["small"]) < 5
    # Draft decoding: 12 MP decoded at half size and grey, about 3 MB, not 36 MB of RGB and its copies.
    assert grown_mb < 40, (seconds, grown_mb)


def test_exif_orientation_is_applied_after_shrinking():
    upright = draw(7, (2400, 3200))
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # as the camera stored it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show it"
    buffer = io.BytesIO()
    sideways.save(buffer, "JPEG", exif=exif)
    want = mnist_digit(_jpeg(upright))
    got = mnist_digit(buffer.getvalue())
    assert distance(got, want) < 5


def test_a_16_bit_grey_png_reads_as_the_same_picture_in_8_bits():
    grey = np.asarray(draw(7, (448, 448)).convert("L").resize((56, 56), Image.Resampling.BOX))  # grey edges
    assert len(np.unique(grey)) > 5
    png = {}
    for bits, pixels in ((8, grey), (16, grey.astype(np.uint16) * 257)):  # 255 -> 65535
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        png[bits] = buffer.getvalue()
    assert Image.open(io.BytesIO(png[16])).mode.startswith("I")  # what PIL makes of 16-bit grey
    # Clipped at 255 instead of scaled, as convert("L") does, all but the darkest ink turns white.
    assert torch.equal(read_grey(png[16]), read_grey(png[8]))


def _jpeg(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG")
    return buffer.getvalue()


# --- predict: every entry named, odd file names, the CSV whole or not at all ---------------------------


def test_file_names_that_are_not_utf8_are_shown_losslessly():
    assert shown(Path("digits/seven.png")) == "digits/seven.png"
    assert shown(Path("digits/sept-été.png")) == "digits/sept-été.png"
    latin1 = Path(os.fsdecode(b"digits/\xe9t\xe9.png"))  # "été" saved by a Latin-1 system
    assert shown(latin1) == "digits/\\xe9t\\xe9.png"
    assert shown(Path("digits/a\\xe9.png")) == "digits/a\\\\xe9.png"  # a real backslash: not the same name
    assert shown(latin1).encode("ascii")  # printable anywhere


def test_every_entry_of_the_folder_is_predicted_or_named_with_its_reason(tmp_path, capsys):
    folder = tmp_path / "digits"
    folder.mkdir()
    draw(7, (60, 80)).save(folder / "seven.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    os.mkfifo(folder / "pipe.png")  # opening it would wait for a writer for ever
    draw(1, (60, 80)).save(folder / "link.png")
    (folder / "cut.png").write_bytes((folder / "seven.png").read_bytes()[:100])
    images, files = load_digits(folder)
    err = capsys.readouterr().err
    assert [f.name for f in files] == ["link.png", "seven.png"] and images.shape == (2, 1, 28, 28)
    reasons = dict(
        line.removeprefix(f"mnist_lit: skipped {folder}/").split(": ", 1) for line in err.splitlines()
    )
    assert sorted(reasons) == ["cut.png", "gone.png", "loop.png", "notes.txt", "pipe.png", "sub.png"], err
    assert reasons["loop.png"] == "a symbolic link that leads nowhere (Too many levels of symbolic links)"
    assert reasons["gone.png"] == "a symbolic link that leads nowhere (No such file or directory)"
    assert reasons["sub.png"].startswith("a folder")
    assert reasons["pipe.png"].startswith("not a regular file")
    assert reasons["notes.txt"].startswith("not an image file")
    assert "truncated" in reasons["cut.png"]


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory, shapes_dir) -> Path:
    """A folder holding one fit run on the 0/1/7 caricatures."""
    folder = tmp_path_factory.mktemp("shapes_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        cli("fit", f"--data.data_dir={shapes_dir}", "--data.val_size=100", "--data.batch_size=25", *QUICK)
    return folder


def test_predict_writes_names_that_are_not_utf8_to_the_csv_and_the_table(shapes_run, monkeypatch, capsys):
    monkeypatch.chdir(shapes_run)
    folder = Path(os.fsdecode(b"odd_names"))
    folder.mkdir()
    names = [b"\xe9t\xe9_seven.png", b"caf\xc3\xa9_one.png", b"back\\slash_zero.png"]
    for name, digit in zip(names, (7, 1, 0), strict=True):
        draw(digit, (90, 120)).save(folder / os.fsdecode(name))
    capsys.readouterr()
    cli("predict", "--data.predict_path=odd_names", "--predictions.output=odd.csv", *QUICK[1:])
    out = capsys.readouterr().out
    with open("odd.csv", encoding="utf-8") as f:
        rows = {row["file"]: int(row["digit"]) for row in csv.DictReader(f)}
    assert rows == {
        "odd_names/\\xe9t\\xe9_seven.png": 7,
        "odd_names/café_one.png": 1,
        "odd_names/back\\\\slash_zero.png": 0,
    }
    for name in rows:
        assert name in out


def test_predicts_pixel_budget_is_a_flag(shapes_run, monkeypatch, capsys):
    monkeypatch.chdir(shapes_run)
    folder = Path("budget")
    folder.mkdir()
    draw(7, (90, 120)).save(folder / "small.png")  # 10,800 pixels
    draw(1, (300, 400)).save(folder / "large.png")  # 120,000 pixels
    cli(
        "predict",
        "--data.predict_path=budget",
        "--data.max_pixels=50000",
        "--predictions.output=b.csv",
        *QUICK[1:],
    )
    with open("b.csv") as f:
        assert [row["file"] for row in csv.DictReader(f)] == ["budget/small.png"]
    skipped = capsys.readouterr().err
    assert "skipped budget/large.png: the image is 300x400 pixels" in skipped
    assert "more than the 50000 pixels allowed" in skipped  # the flag's budget, not the default 50


def test_the_csv_is_written_whole_or_not_at_all(shapes_run, monkeypatch):
    monkeypatch.chdir(shapes_run)
    folder = Path("three")
    folder.mkdir()
    for digit in (0, 1, 7):
        draw(digit, (90, 120)).save(folder / f"{digit}.png")
    real_writer = csv.writer

    class FailsOnTheThirdRow:
        def __init__(self, f):
            self.writer, self.rows = real_writer(f), 0

        def writerow(self, row):
            self.rows += 1
            if self.rows == 3:
                raise OSError(28, "No space left on device")
            self.writer.writerow(row)

    monkeypatch.setattr(csv, "writer", FailsOnTheThirdRow)
    three = ["predict", "--data.predict_path=three", "--predictions.output=out/three.csv", *QUICK[1:]]
    said = "could not write out/three.csv: No space left on device; nothing was written"
    assert error_of(*three) == f"mnist_lit: error: {said}"
    assert list(Path("out").iterdir()) == []  # neither a partial CSV nor its temporary file
    monkeypatch.setattr(csv, "writer", real_writer)
    cli("predict", "--data.predict_path=three", "--predictions.output=out/three.csv", *QUICK[1:])
    assert len(Path("out/three.csv").read_text().splitlines()) == 4
    # An existing output is refused before predicting, and left as it was.
    before = Path("out/three.csv").read_bytes()
    with pytest.raises(SystemExit, match="already exists"):
        cli("predict", "--data.predict_path=three", "--predictions.output=out/three.csv", *QUICK[1:])
    assert Path("out/three.csv").read_bytes() == before
