"""Per-sample processing, pure functions: decode -> validate -> RGB -> crop/resize -> JPEG encode.

Crop policy (documented, used by every source):

- ``frame`` boxes (pre-aligned crops: insightface, RAF-DB aligned, FER2013, ``--detector none``): the
  centred square of side ``min(W, H)`` (the whole image when it is square), resized to
  ``image_size``; the stored box is the whole stored frame ``[0, 0, S, S]``.
- a face box (``annotation`` or a detector's): a square centred on the box, side
  ``box_scale * max(box_w, box_h)`` (default 1.25, a little context around the face), shrunk to the
  image's shorter side when larger, then shifted to lie inside the image (no padding ever), resized
  to ``image_size``. The box is mapped into the stored pixels and clipped to the frame.
- pre-aligned crops with a box (``keep_frame``: a ``frame`` record built with ``--detector``, or an
  ``aligned`` record with an annotation box): the frame policy above for the pixels (the face stays where
  the aligner put it, as SSFER detects faces in aligned images without re-cropping); the box is mapped into
  the stored pixels and recorded (FaceMix's IoUs). No face found there: the fallback box, always (aligned
  labeled sets lose no image), counted as ``fallback``.
- no face found by the detector: skipped (reason ``no_face``; ``ProcessOptions.no_face="skip"``, the
  default), or with ``no_face="keep"`` the fallback box (``detect.fallback_box``: centred square, 0.8 of
  the shorter side) with ``box_source="fallback"`` and the same square-crop rule.

Images that already are a JPEG in RGB at ``image_size``x``image_size`` whose crop would be the whole
frame are passed through byte-for-byte: only the JPEG header is parsed (``jpeg_header``: no PIL, no
decode), plus a check that the data ends with the JPEG end-of-image marker (anything else is decoded
fully, so truncation is caught).

Modes: CMYK/YCbCr/LAB/HSV -> RGB; L/1 -> RGB; I;16 (16-bit) -> scaled by 1/257; I/F -> clipped to
0..255; RGBA/LA/P with transparency -> composited over white. EXIF orientation is not applied (boxes
in annotations refer to the stored pixel layout).
Decompression bombs: images with more than ``max_pixels`` pixels (header check, before decoding)
are skipped (``decompression_bomb``).
"""
from __future__ import annotations

import dataclasses
import io
import warnings
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ssfer_dist.detect import fallback_box
from ssfer_dist.shards.safeimage import jpeg_header

__all__ = ["ProcessOptions", "Processed", "SkipSample", "process_image", "crop_square", "to_rgb",
           "pixels_to_image"]

_EOI = b"\xff\xd9"

Box4 = Tuple[float, float, float, float]


class SkipSample(Exception):
    """A per-sample problem: the sample is skipped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class ProcessOptions:
    """Options of the per-sample transform (one value per build; the defaults are ``build.BuildConfig``'s)."""

    image_size: int
    jpeg_quality: int
    box_scale: float
    max_pixels: int
    no_face: str = "skip"     # the detector found no face: "skip" the image, or "keep" it with the fallback box


@dataclasses.dataclass
class Processed:
    """The stored image and its face box in stored pixels."""

    jpeg: bytes
    box: Box4
    orig_size: Tuple[int, int]
    box_source: str
    passed_through: bool


def crop_square(width: int, height: int, box: Optional[Box4], box_scale: float) -> Tuple[float, float, float]:
    """``(x0, y0, side)`` of the square crop for an image of ``width`` x ``height`` (see module doc);
    ``box=None`` means the whole frame."""
    short = float(min(width, height))
    if box is None:
        return ((width - short) / 2.0, (height - short) / 2.0, short)
    x1, y1, x2, y2 = box
    side = max(1.0, min(short, box_scale * max(x2 - x1, y2 - y1)))
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    x0 = min(max(cx - side / 2.0, 0.0), width - side)
    y0 = min(max(cy - side / 2.0, 0.0), height - side)
    return (x0, y0, side)


def map_box(box: Optional[Box4], crop: Tuple[float, float, float], size: int) -> Box4:
    """Map ``box`` (source pixels) into the stored ``size`` x ``size`` frame of ``crop``; ``None`` ->
    the whole frame."""
    if box is None:
        return (0.0, 0.0, float(size), float(size))
    x0, y0, side = crop
    s = size / side
    out = [(box[0] - x0) * s, (box[1] - y0) * s, (box[2] - x0) * s, (box[3] - y0) * s]
    return tuple(float(min(max(v, 0.0), size)) for v in out)  # type: ignore[return-value]


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (policy in the module doc)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def pixels_to_image(pixels: str, width: int, height: int) -> Image.Image:
    """A grayscale image from FER2013's space-separated pixel string."""
    try:
        arr = np.array(pixels.split(), dtype=np.int64)
    except ValueError:
        raise SkipSample("bad_pixels", "pixel values are not integers") from None
    if arr.size != width * height or arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
        raise SkipSample("bad_pixels", f"expected {width * height} values 0-255, got {arr.size}")
    return Image.fromarray(arr.astype(np.uint8).reshape(height, width), "L")




def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise SkipSample("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipSample("decompression_bomb", str(e).split(".")[0]) from None
    except UnidentifiedImageError:
        raise SkipSample("not_an_image", "unrecognised image data") from None
    except Exception as e:  # truncated headers etc.
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise SkipSample("decompression_bomb", f"{w}x{h} pixels > --max-pixels {max_pixels}")
    if w < 1 or h < 1:
        raise SkipSample("corrupt_image", f"size {w}x{h}")
    return img


def _can_pass_through(img: Image.Image, data: bytes, opts: ProcessOptions, crop) -> bool:
    s = opts.image_size
    return (img.format == "JPEG" and img.mode == "RGB" and img.size == (s, s)
            and crop == (0.0, 0.0, float(s)) and data.rstrip(b"\x00")[-2:] == _EOI)


def _pass_through_fast(raw: bytes, box: Optional[Box4], box_source: str, opts: ProcessOptions,
                       keep_frame: bool = False) -> Optional[Processed]:
    """Pass-through decided from the JPEG header alone (8-bit, 3 components = RGB as PIL reads it,
    ``image_size`` square, crop = whole frame, ends with EOI); ``None`` -> take the general path."""
    s = opts.image_size
    hdr = jpeg_header(raw)
    if hdr is None or hdr != (s, s, 3, 8) or raw.rstrip(b"\x00")[-2:] != _EOI:
        return None
    if box is not None:
        x1, y1, x2, y2 = box
        if not (x2 > x1 and y2 > y1) or x2 <= 0 or y2 <= 0 or x1 >= s or y1 >= s:
            return None  # the general path reports the bad box
    crop = crop_square(s, s, None if keep_frame else box, opts.box_scale)
    if crop != (0.0, 0.0, float(s)):
        return None
    return Processed(raw, map_box(box, crop, s), (s, s), box_source, True)


def process_image(data: Union[bytes, Image.Image], box: Optional[Box4], box_source: str, opts: ProcessOptions,
                  detector=None, keep_frame: bool = False) -> Processed:
    """Turn one source image into the stored JPEG + box (policy in the module doc).

    ``data``: encoded image bytes, or a PIL image (FER2013 pixels). ``box_source``: ``annotation``
    (``box`` given), ``frame`` or ``detect`` (``detector`` runs; ``None`` or kind ``none`` -> frame).
    ``keep_frame``: a pre-aligned crop: the pixels follow the frame policy, the box is only recorded.
    Raises :class:`SkipSample` for per-sample problems.
    """
    if box_source == "detect" and (detector is None or getattr(detector, "kind", "none") == "none"):
        box_source = "frame"
    if box_source == "frame":
        box = None
    elif box_source == "annotation" and box is None:
        raise SkipSample("bad_box", "annotation box missing")
    if isinstance(data, Image.Image):
        img, raw = data, None
    else:
        raw = bytes(data)
        if box_source != "detect":
            fast = _pass_through_fast(raw, box, box_source, opts, keep_frame)
            if fast is not None:
                return fast
        img = _open(raw, opts.max_pixels)
    w, h = img.size
    if box is not None:
        x1, y1, x2, y2 = box
        if not (x2 > x1 and y2 > y1) or x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
            raise SkipSample("bad_box", f"box {list(box)} outside a {w}x{h} image")
    if raw is not None and box_source != "detect":
        crop = crop_square(w, h, None if keep_frame else box, opts.box_scale)
        if _can_pass_through(img, raw, opts, crop):
            return Processed(raw, map_box(box, crop, opts.image_size), (w, h), box_source, True)
    try:
        img.load()
        rgb = to_rgb(img)
    except SkipSample:
        raise
    except Exception as e:
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    if box_source == "detect":
        faces = detector.detect(np.asarray(rgb))
        if faces:
            box, box_source = tuple(float(v) for v in faces[0][:4]), detector.kind
        elif opts.no_face == "skip" and not keep_frame:
            raise SkipSample("no_face", f"the {detector.kind} detector found no face (--no-face keep stores "
                                        f"such images with a centred fallback box)")
        else:
            box, box_source = fallback_box(w, h), "fallback"
    crop = crop_square(w, h, None if keep_frame else box, opts.box_scale)
    x0, y0, side = crop
    s = opts.image_size
    out = rgb.resize((s, s), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=opts.jpeg_quality)
    return Processed(buf.getvalue(), map_box(box, crop, s), (w, h), box_source, False)
