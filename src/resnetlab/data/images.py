"""Turn any image file a user may hand us into the mode a model expects.

JPEG, PNG, WebP, BMP, ...; grayscale, RGBA, palette (with transparency), CMYK, 16-bit and
EXIF-rotated images are converted; anything else is one `ImageError` naming the file.
Decompression bombs are refused before their pixels are decoded.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ResNetLabError

# 64 megapixels: far above any photo we classify, far below what exhausts memory.
MAX_PIXELS = 64_000_000


log = logging.getLogger(__name__)
_EXIF_WARNED: list[bool] = []  # said once per process: a loader meets such a file each epoch


class ImageError(ResNetLabError):
    """A file that is not a readable image."""


def _bomb(path: Path | str, pixels: str) -> ImageError:
    return ImageError(f"{path}: {pixels} pixels is more than {MAX_PIXELS:,}; refusing a "
                      "possible decompression bomb")


def _to_8bit(im: Image.Image) -> Image.Image:
    # PIL's convert("L") clips 16-bit values at 255; scale the full range down instead. A
    # 16-bit file's range is 65535 whatever its pixels (a per-image guess would make a dim
    # frame peaking at 255 257 times brighter than one peaking at 256); 32-bit integer and
    # float images say nothing of their range, so theirs is guessed.
    arr = np.asarray(im, dtype=np.float64)
    top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def _flatten_alpha(im: Image.Image) -> Image.Image:
    # Transparent pixels become black, the background of the data sets we train on.
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def convert_image(im: Image.Image, mode: str) -> Image.Image:
    """Upright, 8-bit, alpha-flattened image in `mode` ("RGB" or "L")."""
    try:
        im = ImageOps.exif_transpose(im) or im
    except Exception:  # malformed EXIF has raised TypeError, IndexError, struct.error...
        if not _EXIF_WARNED:
            log.warning("an image's EXIF orientation is unreadable: such images are used "
                        "as stored, unrotated")
            _EXIF_WARNED.append(True)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = _to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = _flatten_alpha(im)
    return im.convert(mode)


def load_image(path: str | os.PathLike[str] | bytes, mode: str = "RGB",
               name: str = "upload") -> Image.Image:
    """Open, check and convert an image file, or the bytes of one (an upload, called `name`
    in errors); errors name the file and say why."""
    source: Path | io.BytesIO
    if isinstance(path, bytes):
        source, path = io.BytesIO(path), name
    else:
        source = path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise _bomb(path, f"{im.width}x{im.height} = {im.width * im.height:,}")
                im.load()
                return convert_image(im, mode)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL refuses the largest files in Image.open, before we see their size: the same
        # words and limit as ours, with the size from its message.
        size = re.search(r"\((\d+) pixels\)", str(e))
        raise _bomb(path, f"{int(size[1]):,}" if size else "the image's") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: unreadable or truncated image ({e})") from None
