"""The user's own digit images, turned into MNIST-style 28x28 uint8 tensors for ``predict`` and ``serve``.

MNIST was made from scanned digits by: keeping the digit's bounding box, fitting it into 20x20 with
its aspect ratio kept (anti-aliased, hence the grey edges), and placing it in 28x28 so that its centre
of mass is the centre. Digits are bright on black. :func:`mnist_style` repeats these steps so that a
photo of a digit on paper looks to the network like the digits it was trained on.
"""

import io
import math
import os
import stat
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from mnist_lit.errors import UserError, first_line

# What a folder given to --data.predict_path is searched for (a single file is tried whatever its name).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SIZE = 28  # the canvas
BOX = 20  # the digit's bounding box is fitted into BOX x BOX
# After stretching background to 0 and the brightest ink to 255, ink is what is above this: low enough
# to keep a thin pencil stroke, high enough that JPEG noise and paper texture do not widen the box.
INK = 64
# The pixel budget: an image declaring more pixels in its header is refused before anything is decoded.
# 50 megapixels holds every phone camera's default photo (12-50 MP); serve's --max_pixels and predict's
# --data.max_pixels (the same number, data.py) change it.
MAX_PIXELS = 50_000_000
# Larger images are decoded at a reduced scale (JPEG draft: 1/2, 1/4 or 1/8 inside the decoder) and then
# box-shrunk to at most this many pixels on the long side: the digit ends as 20x20, so this loses nothing
# and a 50 MP photo costs megabytes, not gigabytes.
WORKING_SIDE = 1024
# images.py's budget (checked from the header) is the decompression-bomb guard for the user's images.
# PIL's own warns above 89 MP with a bare DecompressionBombWarning and refuses above 179 MP whatever
# the caller allows; it is switched off with Pillow's documented setting.
Image.MAX_IMAGE_PIXELS = None
# EXIF orientation -> the transpose that shows the picture upright (what ImageOps.exif_transpose does;
# applied here after shrinking, so that a large photo is never rotated at full size).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # fmt: skip
EXIF_ORIENTATION = 0x0112


class TooManyPixels(ValueError):
    """The image's header declares more pixels than the budget allows (nothing was decoded)."""


class TruncatedImage(OSError):
    """The file ends before its pixels do."""


# What a file that is not a readable picture of a digit raises, from PIL's decoders or from mnist_style
# (PIL's PNG decoder raises SyntaxError for a broken chunk).
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def shown(path: Path) -> str:
    """A file name as text that maps back to exactly one name: bytes that are not UTF-8 (a name from another
    system's encoding) as ``\\xNN``, and so a backslash itself as ``\\\\``; any other name as it is."""
    text = os.fsdecode(path)
    if os.sep == "/":  # on Windows a backslash is the separator, and names are Unicode already
        text = text.replace("\\", "\\\\")
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def skip(path: Path, reason: str) -> None:
    print(f"mnist_lit: skipped {shown(path)}: {reason}", file=sys.stderr)


def image_files(path: Path) -> list[Path]:
    """The file itself, or the image files directly inside a folder (sorted by name).

    Every other entry of the folder is named on stderr with the reason it is skipped.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(
            f"--data.predict_path {shown(path)} does not exist: give an image file or a folder of them"
        )
    try:
        entries = sorted(Path(entry.path) for entry in os.scandir(path))
    except OSError as err:
        raise UserError(f"--data.predict_path {shown(path)} cannot be read: {err.strerror}") from None
    files = []
    for entry in entries:
        try:
            mode = entry.stat().st_mode  # follows a symbolic link
        except OSError as err:  # a link to nowhere, or a loop of links
            skip(entry, f"{'a symbolic link that leads nowhere' if entry.is_symlink() else 'unreadable'} "
                 f"({err.strerror})")  # fmt: skip
            continue
        if stat.S_ISDIR(mode):
            skip(entry, "a folder (only the files directly inside --data.predict_path are read)")
        elif not stat.S_ISREG(mode):
            skip(entry, "not a regular file (a pipe, socket or device)")
        elif entry.suffix.lower() not in IMAGE_SUFFIXES:
            skip(entry, f"not an image file ({', '.join(IMAGE_SUFFIXES)})")
        else:
            files.append(entry)
    if not files:
        raise UserError(f"--data.predict_path {shown(path)} has no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def pixel_count(pixels: int) -> str:
    """A number of pixels as a refusal says it: in megapixels from a million up, else in pixels (a small
    --max_pixels was "0.005 megapixels", and an image under it "0.0 megapixels")."""
    number, unit = (f"{pixels / 1e6:g}", "megapixel") if pixels >= 1_000_000 else (str(pixels), "pixel")
    return f"{number} {unit}" + ("" if number == "1" else "s")


def read_grey(source: Path | bytes, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Decode any PIL-readable image (a file, or its bytes) into (1, H, W) uint8 grey, upright.

    Refused before decoding: more than ``max_pixels`` pixels (TooManyPixels). Refused while decoding: a
    file that ends early (TruncatedImage, or PIL's OSError). Transparency is laid on white paper. An
    image larger than WORKING_SIDE on its long side comes back shrunk to it.
    """
    size_on_disk = len(source) if isinstance(source, bytes) else os.stat(source).st_size
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise TooManyPixels(
                f"the image is {width}x{height} pixels ({pixel_count(width * height)}), more than the "
                f"{pixel_count(max_pixels)} allowed"
            )
        if image.format == "JPEG":
            # Every 8x8 block of a (Huffman-coded) JPEG takes at least one bit: a file smaller than that
            # lost its end, and libjpeg would quietly paint the missing part grey.
            if size_on_disk < width * height / 512:
                raise TruncatedImage(
                    f"image file is truncated: {size_on_disk} bytes cannot hold {width}x{height} pixels"
                )
            scale = max(width, height) / WORKING_SIDE
            if scale >= 2:  # let the decoder skip detail: 1/2, 1/4 or 1/8 of the size, straight to grey
                image.draft("L", (math.ceil(width / scale), math.ceil(height / scale)))
        image.load()  # decode now (PIL is lazy), inside this function: a truncated file raises here
        orientation = image.getexif().get(EXIF_ORIENTATION)  # phone photos store their rotation as a tag
        if image.mode.startswith("I"):  # 16-bit grey (PNG): convert("L") would clip it at 255, not scale it
            image = image.convert("I").point(lambda value: value * (1 / 257), "L")
        transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        wanted = "RGBA" if transparent else "L"
        picture = image if image.mode == wanted else image.convert(wanted)
    factor = math.ceil(max(picture.size) / WORKING_SIDE)
    if factor > 1:
        picture = picture.reduce(factor)  # a box filter: each output pixel is the mean of factor^2
    if orientation in UPRIGHT:
        picture = picture.transpose(UPRIGHT[orientation])
    if transparent:
        paper = Image.new("RGBA", picture.size, "white")
        picture = Image.alpha_composite(paper, picture).convert("L")
    return TF.pil_to_tensor(picture)


def mnist_style(grey: torch.Tensor) -> torch.Tensor:
    """(1, H, W) uint8 grey, any size, either polarity -> (1, 28, 28) uint8, bright digit on black.

    Raises ValueError when the image holds no digit (it is one flat shade).
    """
    pixels = grey.float()
    border = torch.cat([pixels[0, 0], pixels[0, -1], pixels[0, :, 0], pixels[0, :, -1]])
    if border.median() > 127:  # light paper: MNIST's ink is the bright part
        pixels = 255 - pixels
        border = 255 - border
    background, ink = border.median(), pixels.max()
    if ink - background < INK:
        raise ValueError("no digit found: the image is (almost) one flat shade")
    pixels = ((pixels - background) / (ink - background) * 255).clamp(0, 255)

    rows, cols = (pixels[0] > INK).nonzero(as_tuple=True)
    digit = pixels[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = digit.shape[1:]
    scale = BOX / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    digit = TF.resize(digit, size, antialias=True).clamp(0, 255)

    # Centre of mass, in the digit box's pixel coordinates, then the offset that puts it on the canvas
    # centre; clamped so that an off-balance digit (a "7") is shifted but never cut off.
    ys, xs = torch.arange(size[0], dtype=torch.float32), torch.arange(size[1], dtype=torch.float32)
    mass = digit[0].sum()
    centre_y, centre_x = (digit[0].sum(1) @ ys) / mass, (digit[0].sum(0) @ xs) / mass
    top = min(max(round((SIZE - 1) / 2 - centre_y.item()), 0), SIZE - size[0])
    left = min(max(round((SIZE - 1) / 2 - centre_x.item()), 0), SIZE - size[1])
    canvas = torch.zeros(1, SIZE, SIZE)
    canvas[:, top : top + size[0], left : left + size[1]] = digit
    return canvas.round().to(torch.uint8)


def mnist_digit(source: Path | bytes, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """An image file, or its bytes, as the (1, 28, 28) uint8 digit the network sees.

    The one preprocessing of ``predict --data.predict_path`` and ``serve``; raises one of UNREADABLE.
    """
    return mnist_style(read_grey(source, max_pixels=max_pixels))


def load_digits(path: Path, max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, list[Path]]:
    """MNIST-style images (N, 1, 28, 28) uint8 of every readable image at ``path``, and their files.

    An unreadable file is reported on stderr (file and reason) and skipped; UserError when none is left.
    """
    files = image_files(path)
    images, readable = [], []
    for file in files:
        try:
            images.append(mnist_digit(file, max_pixels=max_pixels))
            readable.append(file)
        except UNREADABLE as err:
            # An OSError's own message repeats the file name (Python's repr of it): its reason suffices.
            reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
            skip(file, reason)
    if not images:
        # A folder's other entries were named as skipped already; its count is of its image files.
        counted = "image file(s) in" if path.is_dir() else "file(s) at"
        raise UserError(
            f"none of the {len(files)} {counted} --data.predict_path {shown(path)} could be read as a "
            "digit image"
        )
    return torch.stack(images), readable
