"""The one place image bytes and files become pixels: uint8 RGB [H, W, 3], sizes checked before decoding.

Every decode goes through :func:`read_rgb`, which

* opens the image lazily (``PIL.Image.open`` reads only the header) and checks its width and height against the
  size the caller needs (exactly 32x32 for ``--data``) or, when the caller resizes, against :data:`MAX_SIDE`,
  *before* any pixel is decoded, so a 12 KB PNG that claims 10000x10000 never takes a gigabyte;
* turns Pillow's own decompression-bomb error and warning into that same one-line refusal;
* opens only the raster formats listed in :data:`FORMATS` (Pillow would otherwise hand an ``.eps`` named
  ``x.png`` to Ghostscript);
* maps 16-bit images to 8 bits by their high byte (``v >> 8``, the mapping Pillow itself applies to 16-bit RGB
  PNGs), where ``convert("RGB")`` would clip every value above 255 to white;
* turns the image as its EXIF orientation says (as every viewer shows it; the size check uses the turned size);
* keeps the RGB values of an image with transparency as stored (alpha is not composited on any background, as
  torchvision's loader does) and reads frame 1 of an animation; for a single image the caller is told (``notes``).

PIL is imported inside the functions: the CLI imports this module's callers at start-up.
"""
from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np

from .errors import UserError

#: the largest width or height decoded at all (a 4096x4096 RGB image is 48 MB decoded); only callers that
#: resize accept anything but their exact size
MAX_SIDE = 4096
#: what Pillow may identify a file as; everything else is refused before decoding
FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF", "PPM")
#: the file names image folders and archives take images from: every format in FORMATS (Pillow's PPM reader
#: also reads .pbm/.pgm/.pnm); any other file is skipped, and counted in a warning
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm")
#: modes that hold more than 8 bits per sample and are scaled (not clipped) to uint8
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


#: EXIF orientation -> the turn that shows the image upright (the table of ``PIL.ImageOps.exif_transpose``)
_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                7: "TRANSVERSE", 8: "ROTATE_90"}


def read_rgb(source: bytes | str | Path, name: str | None = None, *, size: int | None = None,
             resize: bool = False, hint: str = "", notes: list[str] | None = None) -> np.ndarray:
    """Decode ``source`` (a path, or the bytes of an image file) to uint8 RGB ``[H, W, 3]``.

    ``size``: the side the caller needs (``None``: any size up to :data:`MAX_SIDE`). An image of another size is
    refused before decoding, unless ``resize`` is true: then any image up to :data:`MAX_SIDE` is decoded and
    scaled (bilinear) to ``size`` x ``size``. ``name`` names the image in errors (default: the path); ``hint``
    is appended to the wrong-size error (e.g. "pass --resize to scale it"). ``notes``, if given, receives what
    was not read as the file might suggest (alpha ignored, one frame of several). Raises :class:`UserError` for
    anything that is not a decodable image of an accepted size.
    """
    from PIL import Image, UnidentifiedImageError

    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else "image"
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with warnings.catch_warnings():
            # Pillow warns above 89 M pixels and raises above 179 M; the size check below is the real (much
            # lower) limit, so its warning is noise and its error becomes the same one-line refusal
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=FORMATS)
    except Image.DecompressionBombError as exc:
        # Pillow refuses before our size check can run; its message holds the pixel count, not the sides
        count = re.search(r"\((\d+) pixels\)", str(exc))
        size_text = f"{int(count[1]):,} pixels" if count else "too many pixels"
        raise UserError(f"{name}: image too large to decode ({size_text}); images up to {MAX_SIDE}x{MAX_SIDE} "
                        f"are accepted") from None
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image (cannot decode it; accepted formats: "
                        f"{', '.join(f.lower() for f in FORMATS)})") from None
    except OSError as exc:
        raise UserError(f"{name}: cannot read it ({exc.strerror or exc})") from None
    with im:
        try:
            turn = _ORIENTATION.get(int(im.getexif().get(0x0112, 1)))
        except Exception:  # noqa: BLE001 -- a damaged EXIF block: the pixels as stored, like a viewer that skips it
            turn = None
        w, h = im.size
        if turn in ("TRANSPOSE", "ROTATE_270", "TRANSVERSE", "ROTATE_90"):
            w, h = h, w  # the size the user sees, and the one checked
        if size is not None and (w, h) != (size, size) and not resize:
            raise UserError(f"{name} is {w}x{h}, not {size}x{size}" + (f" ({hint})" if hint else ""))
        if w > MAX_SIDE or h > MAX_SIDE or w < 1 or h < 1:
            raise UserError(f"{name} is {w}x{h}; images up to {MAX_SIDE}x{MAX_SIDE} are accepted")
        try:
            rgb = _to_rgb(im, name)
        except UserError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            # truncated or corrupt pixel data; Pillow reports it with these types depending on the format
            raise UserError(f"{name}: cannot decode it ({type(exc).__name__}: {exc})") from None
        if notes is not None:
            if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
                notes.append("its transparency is ignored (the RGB values as stored, not composited)")
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                notes.append(f"it has {frames} frames; the first is used")
    if turn is not None:
        rgb = np.asarray(Image.fromarray(rgb).transpose(getattr(Image.Transpose, turn)))
    if size is not None and rgb.shape[:2] != (size, size):
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
    return np.ascontiguousarray(rgb)


def _to_rgb(im, name: str) -> np.ndarray:
    """The decoded pixels as uint8 RGB; wide gray modes keep their high byte instead of clipping."""
    if im.mode in _WIDE_MODES:
        wide = np.asarray(im)  # decodes; I;16 gives uint16 (either byte order), I gives int32
        if wide.size and (wide.min() < 0 or wide.max() > 0xFFFF):
            raise UserError(f"{name}: {im.mode} pixel values outside 0..65535 (not a 16-bit image)")
        gray = (wide.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "F":
        raise UserError(f"{name}: floating-point images have no defined pixel range; save it as 8- or 16-bit")
    return np.asarray(im.convert("RGB"))
