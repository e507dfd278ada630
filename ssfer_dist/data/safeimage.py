"""Opening untrusted image bytes (shard members, photos) without letting a crafted header allocate gigabytes.

PIL reads the size from the header before decoding; an image that claims more than ``max_pixels`` pixels
(a decompression bomb, or simply not a stored face crop) is refused with :class:`ImageTooLarge` before any
pixel is decoded. PIL's own bomb errors (``DecompressionBombError``) and decode errors propagate to the
caller, which counts the sample as corrupt.
"""
from __future__ import annotations

import io

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
