"""Opening untrusted image bytes (shard members, photos) without letting a crafted header allocate gigabytes.

PIL reads the size from the header before decoding; an image that claims more than ``max_pixels`` pixels
(a decompression bomb, or simply not a stored face crop) is refused with :class:`ImageTooLarge` before any
pixel is decoded. PIL's own bomb errors (``DecompressionBombError``) and decode errors propagate to the
caller, which counts the sample as corrupt.
"""
from __future__ import annotations

import io
from typing import Optional, Tuple

__all__ = ["ImageTooLarge", "open_image", "DEFAULT_MAX_PIXELS"]

# A stored face crop is image_size² (112² .. 448²); 4096² leaves room for any source photo a tool shows.
DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageTooLarge(ValueError):
    """The header claims more pixels than allowed."""


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
    """``PIL.Image.open`` of ``data`` with the header's pixel count checked (the image is not yet loaded)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLarge(f"{img.format} header claims {w}x{h} pixels, over the {max_pixels}-pixel cap")
    return img


# JPEG start-of-frame markers (baseline, progressive, lossless …; not DHT/JPG/DAC)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_header(data: bytes) -> Optional[Tuple[int, int, int, int]]:
    """``(width, height, components, precision)`` from a JPEG's SOF marker without decoding, or
    ``None`` when ``data`` is not a JPEG whose header parses (the caller then decodes with PIL)."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF:
            if i + 10 > n:
                return None
            prec = data[i + 4]
            h = (data[i + 5] << 8) | data[i + 6]
            w = (data[i + 7] << 8) | data[i + 8]
            return (w, h, data[i + 9], prec)
        if marker in (0xDA, 0xD9) or seg < 2:
            return None
        i += 2 + seg
    return None
