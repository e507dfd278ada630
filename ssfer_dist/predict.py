"""``ssfer predict``: find faces in photos with the shard builder's offline detector
(``ssfer_dist.detect.make_detector``), crop each with a margin, classify its expression.

Crop: a square centred on the detected box, side = ``(1 + margin)`` × the box's longer side (the same
quantity as ``ssfer-shard build --box-scale``), resized to the model's input size, normalised with the
mean/std stored in the weights. ``--detector none`` classifies the whole image as one face, uncropped
(for aligned crops).

Outputs: a table on stdout, or ``--json`` lines ``{"image", "face", "box", "label", "score",
"probabilities"}``; ``--annotate DIR`` writes ``DIR/<image stem>.png`` with boxes and labels drawn.
A file that is not an image, or an image without a face, is reported (stderr, and an ``"error"`` JSON
line) and the others are still processed; the exit status is non-zero only when no face at all was
classified.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ssfer_dist.detect import make_detector
from ssfer_dist.errors import UserError
from ssfer_dist.evaluate import _load_model
from ssfer_dist.shards.safeimage import open_image
from ssfer_dist.synth import is_synthetic

log = logging.getLogger(__name__)

__all__ = ["Predictor", "list_inputs", "predict_cli", "crop_square"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

PHOTO_MAX_PIXELS = 64 * 1024 * 1024   # photos given to `ssfer predict` (header checked before decoding)


def list_inputs(inputs: Sequence[str]) -> List[str]:
    """Files named directly (any type: a non-image is reported later) plus image files under folders."""
    out: List[str] = []
    for p in inputs:
        if os.path.isdir(p):
            for root, _dirs, files in os.walk(p):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTS):
                        out.append(os.path.join(root, f))
        else:
            out.append(p)
    return out


def crop_square(img, box: Sequence[float], margin: float):
    """A square crop centred on ``box`` with side ``(1 + margin) * longer side`` (PIL pads with black)."""
    x1, y1, x2, y2 = [float(v) for v in box[:4]]
    side = max(x2 - x1, y2 - y1) * (1.0 + margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return img.crop((int(round(cx - side / 2)), int(round(cy - side / 2)),
                     int(round(cx + side / 2)), int(round(cy + side / 2))))


class Predictor:
    """A classifier plus a detector: ``predict(PIL image) -> [(box, probabilities)]``."""

    def __init__(self, weights: str, detector: str = "haar", margin: float = 0.2):
        self.model, self.meta = _load_model(weights)
        self.class_names = list(self.meta.get("class_names") or [])
        nc = int(self.meta["arch"]["num_classes"])
        if len(self.class_names) != nc:
            self.class_names = [f"class_{i}" for i in range(nc)]
        self.img_size = int(self.meta["arch"]["img_size"])

        synthetic = [d for d in self.meta.get("trained_on", []) if is_synthetic(d)]
        if synthetic:
            log.warning("%s was trained on the synthetic demo data (%s): drawn faces, not photos, so its labels "
                        "on real photos mean little; train on a real FER set (e.g. configs/finetune_rafdb.yaml) "
                        "for that", weights, ", ".join(synthetic))
        self.detector_kind = detector
        self.detector = make_detector(detector)
        if margin < 0:
            raise UserError(f"--margin must be >= 0, got {margin}")
        self.margin = margin

    def boxes(self, rgb: np.ndarray) -> List[Tuple[float, float, float, float, float]]:
        if self.detector_kind == "none":
            h, w = rgb.shape[:2]
            return [(0.0, 0.0, float(w), float(h), 1.0)]
        return list(self.detector.detect(rgb))

    def classify(self, crops: List) -> np.ndarray:
        """Softmax probabilities [N, C] for PIL face crops."""
        import torch

        from ssfer_dist.data.transforms import build_transform, normalize_on_device

        tf = build_transform("eval", self.img_size, uint8=True)
        x = torch.stack([tf(c.convert("RGB"), None)[0] for c in crops])
        with torch.no_grad():
            x = normalize_on_device(x, self.meta.get("mean"), self.meta.get("std"))
            return self.model(x).softmax(1).numpy()

    def predict(self, img) -> List[Tuple[Tuple[float, float, float, float], np.ndarray]]:
        rgb = np.asarray(img.convert("RGB"))
        boxes = self.boxes(rgb)
        if not boxes:
            return []
        if self.detector_kind == "none":  # aligned crops: the whole image is the face, as in the shards
            probs = self.classify([img])
        else:
            probs = self.classify([crop_square(img, b, self.margin) for b in boxes])
        return [(tuple(float(v) for v in b[:4]), p) for b, p in zip(boxes, probs)]


def _annotate(img, results, names: List[str], path: str) -> None:
    from PIL import ImageDraw

    im = img.convert("RGB").copy()
    d = ImageDraw.Draw(im)
    lw = max(1, round(min(im.size) / 150))
    for box, p in results:
        k = int(np.argmax(p))
        d.rectangle(box, outline=(255, 40, 40), width=lw)
        label = f"{names[k]} {p[k]:.2f}"
        tx, ty = box[0], max(0, box[1] - 12)
        d.rectangle([tx, ty, tx + 7 * len(label), ty + 11], fill=(255, 40, 40))
        d.text((tx + 1, ty), label, fill="white")
    im.save(path)


def predict_cli(weights: str, inputs: Sequence[str], as_json: bool = False, annotate: Optional[str] = None,
                detector: str = "haar", margin: float = 0.2, out=None) -> int:
    """``ssfer predict``: see the module docstring. Returns 0 when at least one face was classified."""
    from PIL import Image, UnidentifiedImageError

    out = out or sys.stdout
    pred = Predictor(weights, detector=detector, margin=margin)
    files = list_inputs(inputs)
    if not files:
        raise UserError(f"no image files found in {list(inputs)}")
    if annotate:
        os.makedirs(annotate, exist_ok=True)
    names = pred.class_names
    num_faces, problems = 0, 0
    if not as_json:
        print(f"{'image':<40} {'face':>4} {'box (x1,y1,x2,y2)':<24} {'label':<10} {'score':>5}", file=out)

    def problem(path: str, msg: str) -> None:
        nonlocal problems
        problems += 1
        print(f"ssfer predict: {path}: {msg}", file=sys.stderr)
        if as_json:
            print(json.dumps({"image": path, "error": msg}), file=out)

    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
            # a photo may be large (64 Mpx like `ssfer-shard build --max-pixels`), a bomb header is refused
            with open_image(data, max_pixels=PHOTO_MAX_PIXELS) as im:
                im.load()
                img = im.convert("RGB")
        except FileNotFoundError:
            problem(path, "file not found")
            continue
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            problem(path, f"not a readable image ({type(e).__name__})")
            continue
        results = pred.predict(img)
        if not results:
            problem(path, f"no face found (detector {detector})")
            continue
        for i, (box, p) in enumerate(results):
            k = int(np.argmax(p))
            num_faces += 1
            if as_json:
                print(json.dumps({"image": path, "face": i, "box": [round(v, 1) for v in box], "label": names[k],
                                  "score": round(float(p[k]), 4),
                                  "probabilities": {n: round(float(v), 4) for n, v in zip(names, p)}}), file=out)
            else:
                b = ",".join(f"{v:.0f}" for v in box)
                print(f"{path[-40:]:<40} {i:>4} {b:<24} {names[k]:<10} {p[k]:>5.2f}", file=out)
        if annotate:
            stem = os.path.splitext(os.path.basename(path))[0]
            _annotate(img, results, names, os.path.join(annotate, f"{stem}.png"))
    if num_faces == 0:
        print(f"ssfer predict: no face classified in {len(files)} input(s)", file=sys.stderr)
        return 1
    if problems:
        log.info("%d face(s) classified; %d input(s) had problems", num_faces, problems)
    return 0
