"""The user's own digit images, turned into MNIST-style 28x28 uint8 tensors for ``predict`` and ``serve``.

MNIST was made from scanned digits by: keeping the digit's bounding box, fitting it into 20x20 with
its aspect ratio kept (anti-aliased, hence the grey edges), and placing it in 28x28 so that its centre
of mass is the centre. Digits are bright on black. :func:`mnist_style` repeats these steps so that a
photo of a digit on paper looks to the network like the digits it was trained on.
"""

import io
import sys
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from mnist_lit.errors import UserError, first_line

# What a folder given to --data.predict_path is searched for (a single file is tried whatever its name).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SIZE = 28  # the canvas
BOX = 20  # the digit's bounding box is fitted into BOX x BOX
# After stretching background to 0 and the brightest ink to 255, ink is what is above this: low enough
# to keep a thin pencil stroke, high enough that JPEG noise and paper texture do not widen the box.
INK = 64
# What a file that is not a readable picture of a digit raises, from PIL's decoders or from mnist_style
# (PIL's PNG decoder raises SyntaxError for a broken chunk).
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def image_files(path: Path) -> list[Path]:
    """The file itself, or the image files directly inside a folder (sorted by name)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"--data.predict_path {path} does not exist: give an image file or a folder of them")
    entries = sorted(p for p in path.iterdir() if p.is_file())
    files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    for other in sorted(set(entries) - set(files)):
        print(f"mnist_lit: skipped {other}: not an image file ({', '.join(IMAGE_SUFFIXES)})", file=sys.stderr)
    if not files:
        raise UserError(f"--data.predict_path {path} has no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_grey(source: Path | bytes) -> torch.Tensor:
    """Decode any PIL-readable image (a file, or its bytes) into (1, H, W) uint8 grey.

    Transparency is laid on white paper.
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image = ImageOps.exif_transpose(image)  # phone photos store their rotation as a tag
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            paper = Image.new("RGBA", image.size, "white")
            image = Image.alpha_composite(paper, image.convert("RGBA"))
        return TF.pil_to_tensor(image.convert("L"))


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


def mnist_digit(source: Path | bytes) -> torch.Tensor:
    """An image file, or its bytes, as the (1, 28, 28) uint8 digit the network sees.

    The one preprocessing of ``predict --data.predict_path`` and ``serve``; raises one of UNREADABLE.
    """
    return mnist_style(read_grey(source))


def load_digits(path: Path) -> tuple[torch.Tensor, list[Path]]:
    """MNIST-style images (N, 1, 28, 28) uint8 of every readable image at ``path``, and their files.

    An unreadable file is reported on stderr (file and reason) and skipped; UserError when none is left.
    """
    files = image_files(path)
    images, readable = [], []
    for file in files:
        try:
            images.append(mnist_digit(file))
            readable.append(file)
        except UNREADABLE as err:
            print(f"mnist_lit: skipped {file}: {first_line(err)}", file=sys.stderr)
    if not images:
        raise UserError(
            f"none of the {len(files)} file(s) at --data.predict_path {path} could be read as a digit image"
        )
    return torch.stack(images), readable
