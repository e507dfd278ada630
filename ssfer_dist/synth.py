"""Procedural synthetic faces for the demo and tests: expressions drawn with brows, eyes and mouth.

Every face is drawn from a handful of geometric parameters. The 7 canonical classes (see
``ssfer_dist.shards.schema.CLASS_NAMES``) differ in brow height/slant, eye opening and mouth shape;
``intensity`` scales how far an expression departs from neutral (low intensity = hard samples), and
per-face jitter blurs the class boundaries. Nuisance variation: skin, hair and background colour,
in-plane rotation, scale, position, background clutter, brightness and pixel noise.

Face boxes are exact: the box is the bounding box of the (rotated) head ellipse in output pixels.

Two writers:

- :func:`write_rafdb` — a labeled set in RAF-DB's on-disk layout (``EmoLabel/list_patition_label.txt``
  with RAF-DB's own label ids 1..7, ``Image/aligned/<split>_NNNNN_aligned.jpg``). RAF-DB's aligned
  images are face-filling crops, so a shard builder takes the whole frame as the face box; we draw the
  head so that its box *is* the frame (up to a few pixels of jitter) — the layout's box convention then
  tells the truth. The exact per-image boxes are also written to ``synth_boxes.csv`` for tests.
- :func:`write_identity_folders` — a larger unlabeled set in VGGFace2's folder-per-identity layout
  (``train/n000001/0001_01.jpg``) where faces sit in larger cluttered frames at varying scale and
  position, with the exact boxes in ``bb_landmark/loose_bb_train.csv`` (``NAME_ID,X,Y,W,H``). Each
  identity keeps its face shape and colours; its expressions are drawn from all 7 classes, so the set
  has the same class structure as the labeled one but no labels (what semi-supervised learning uses).

Pure numpy + PIL, deterministic given a seed (each image has its own generator derived from
``(seed, stream, index)``), and cheap enough to draw a demo set on the fly.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ssfer_dist.shards.schema import CLASS_NAMES, NUM_CLASSES_7, RAFDB_TO_CANONICAL

__all__ = [
    "SynthConfig",
    "FaceParams",
    "sample_params",
    "render_face",
    "write_rafdb",
    "write_identity_folders",
    "canonical_to_rafdb",
]

# Expression prototypes (deviations from neutral at intensity 1), in face-local units.
#   brow_in / brow_out: vertical raise of inner/outer brow end (fraction of face half-height, up > 0)
#   eye_open: eye opening multiplier; mouth_curve: corner lift (up > 0 = smile, fraction of half-width)
#   mouth_open: opening height (fraction of half-width); mouth_width: multiplier; sneer: asymmetric lift
_PROTO: Dict[str, Dict[str, float]] = {
    "neutral":   dict(brow_in=0.00, brow_out=0.00, eye_open=1.0,
                      mouth_curve=0.00, mouth_open=0.00, mouth_width=1.0, sneer=0.0),
    "happiness": dict(brow_in=0.02, brow_out=0.02, eye_open=0.7,
                      mouth_curve=0.16, mouth_open=0.05, mouth_width=1.3, sneer=0.0),
    "surprise":  dict(brow_in=0.16, brow_out=0.16, eye_open=1.8,
                      mouth_curve=0.00, mouth_open=0.30, mouth_width=0.6, sneer=0.0),
    "sadness":   dict(brow_in=0.12, brow_out=-0.05, eye_open=0.8,
                      mouth_curve=-0.13, mouth_open=0.00, mouth_width=0.9, sneer=0.0),
    "anger":     dict(brow_in=-0.12, brow_out=0.05, eye_open=0.55,
                      mouth_curve=-0.03, mouth_open=0.00, mouth_width=0.75, sneer=0.0),
    "disgust":   dict(brow_in=-0.07, brow_out=-0.03, eye_open=0.6,
                      mouth_curve=-0.05, mouth_open=0.03, mouth_width=0.9, sneer=0.14),
    "fear":      dict(brow_in=0.14, brow_out=0.06, eye_open=1.6,
                      mouth_curve=-0.05, mouth_open=0.15, mouth_width=1.25, sneer=0.0),
}
_NEUTRAL = _PROTO["neutral"]


SYNTH_PREFIX = "synth"     # the demo's shard sets are named synthfer / synthfr


def is_synthetic(dataset: str) -> bool:
    """Whether a manifest's / export's dataset name is one of the demo's synthetic sets."""
    return str(dataset).startswith(SYNTH_PREFIX)


def canonical_to_rafdb(cls: int) -> int:
    """Canonical class index (0..6) -> RAF-DB label id (1..7)."""
    return RAFDB_TO_CANONICAL.index(int(cls)) + 1


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Difficulty knobs. ``intensity`` is drawn uniformly in [min_intensity, max_intensity]; ``jitter``
    is the std of per-feature noise added to every face (in the prototype's units)."""

    min_intensity: float = 0.8
    max_intensity: float = 1.0
    jitter: float = 0.15
    max_rotation_deg: float = 10.0
    clutter: int = 6
    noise_std: float = 6.0


@dataclasses.dataclass(frozen=True)
class FaceParams:
    cls: int
    brow_in: float
    brow_out: float
    eye_open: float
    mouth_curve: float
    mouth_open: float
    mouth_width: float
    sneer: float
    aspect: float  # head half-height / half-width
    skin: Tuple[int, int, int]
    hair: Tuple[int, int, int]
    hair_amount: float
    rotation_deg: float


def _identity_traits(rng: np.random.Generator) -> Dict[str, object]:
    tone = rng.uniform(0.25, 1.0)
    skin = (int(120 + 120 * tone + rng.integers(-10, 10)), int(80 + 110 * tone + rng.integers(-10, 10)),
            int(60 + 100 * tone + rng.integers(-10, 10)))
    skin = tuple(int(np.clip(c, 0, 255)) for c in skin)
    hair = tuple(int(v) for v in rng.integers(10, 140, 3))
    return dict(skin=skin, hair=hair, hair_amount=float(rng.uniform(0.0, 1.0)), aspect=float(rng.uniform(1.12, 1.38)))


def sample_params(rng: np.random.Generator, cls: int, cfg: SynthConfig = SynthConfig(),
                  traits: Optional[Dict[str, object]] = None) -> FaceParams:
    """Draw the geometric parameters of one face of canonical class ``cls`` (0..6)."""
    if not 0 <= cls < NUM_CLASSES_7:
        raise ValueError(f"synthetic faces have classes 0..6, got {cls}")
    proto = _PROTO[CLASS_NAMES[cls]]
    t = rng.uniform(cfg.min_intensity, cfg.max_intensity)
    traits = traits or _identity_traits(rng)
    scale = {"brow_in": 0.05, "brow_out": 0.04, "eye_open": 0.35, "mouth_curve": 0.05, "mouth_open": 0.05,
             "mouth_width": 0.15, "sneer": 0.04}
    vals = {}
    for k, s in scale.items():
        v = _NEUTRAL[k] + t * (proto[k] - _NEUTRAL[k]) + rng.normal(0.0, cfg.jitter * s)
        vals[k] = float(v)
    vals["eye_open"] = max(vals["eye_open"], 0.25)
    vals["mouth_open"] = max(vals["mouth_open"], 0.0)
    vals["mouth_width"] = max(vals["mouth_width"], 0.4)
    return FaceParams(cls=int(cls), aspect=float(traits["aspect"]), skin=tuple(traits["skin"]),
                      hair=tuple(traits["hair"]), hair_amount=float(traits["hair_amount"]),
                      rotation_deg=float(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)), **vals)


def _face_layer(p: FaceParams, a: float) -> Image.Image:
    """RGBA image of a head with half-width ``a`` px (at supersampled scale), centred in its canvas."""
    b = a * p.aspect
    half = int(math.ceil(b * 1.05)) + 2
    size = 2 * half
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    cx = cy = half
    dark = (30, 20, 20, 255)
    # Head.
    d.ellipse([cx - a, cy - b, cx + a, cy + b], fill=p.skin + (255,))
    # Hair: a cap over the top of the head (clipped to the head ellipse below).
    if p.hair_amount > 0.3:
        hair_layer = Image.new("L", (size, size), 0)
        hd = ImageDraw.Draw(hair_layer)
        top = cy - b
        hd.rectangle([0, 0, size, top + (0.25 + 0.25 * p.hair_amount) * b], fill=255)
        head_mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(head_mask).ellipse([cx - a, cy - b, cx + a, cy + b], fill=255)
        mask = Image.fromarray(np.minimum(np.asarray(hair_layer), np.asarray(head_mask)))
        img.paste(Image.new("RGBA", (size, size), p.hair + (255,)), (0, 0), mask)
    lw = max(1, int(round(a * 0.08)))
    # Eyes.
    ey = cy - 0.12 * b
    ew = 0.19 * a
    eh = 0.1 * a * p.eye_open
    for sgn in (-1, 1):
        ex = cx + sgn * 0.4 * a
        sq = 1.0 - (0.35 * p.sneer / 0.14 if (sgn > 0 and p.sneer > 0) else 0.0)  # disgust: one eye narrower
        h = max(eh * max(sq, 0.3), 0.02 * a)
        d.ellipse([ex - ew, ey - h, ex + ew, ey + h], fill=(245, 245, 245, 255), outline=dark, width=max(1, lw // 2))
        pr = min(0.07 * a, h)
        d.ellipse([ex - pr, ey - pr, ex + pr, ey + pr], fill=(20, 20, 30, 255))
    # Brows: inner end near the nose, outer end at the temple.
    by = cy - 0.42 * b
    for sgn in (-1, 1):
        xi, xo = cx + sgn * 0.14 * a, cx + sgn * 0.62 * a
        yi, yo = by - p.brow_in * 2 * b, by - p.brow_out * 2 * b
        d.line([xi, yi, xo, yo], fill=dark, width=int(lw * 3))
    # Nose.
    d.line([cx, cy - 0.05 * b, cx - 0.06 * a, cy + 0.18 * b, cx + 0.03 * a, cy + 0.2 * b], fill=dark,
           width=max(1, lw // 2))
    if p.sneer > 0.07:  # disgust: wrinkles beside the nose
        for sgn in (-1, 1):
            d.line([cx + sgn * 0.1 * a, cy + 0.02 * b, cx + sgn * 0.18 * a, cy + 0.12 * b], fill=dark,
                   width=max(1, lw // 2))
    # Mouth: corners at +-w, centre at my; corner lift = curve (+ sneer on one side); open = lip gap.
    my = cy + 0.5 * b
    w = 0.36 * a * p.mouth_width
    n = 16
    xs = np.linspace(-1.0, 1.0, n)
    lift = p.mouth_curve * a * 2.0 * xs ** 2 + p.sneer * a * 2.0 * np.clip(xs, 0, None) ** 2
    upper = [(cx + w * x, my - lf - 0.5 * p.mouth_open * a * (1 - x ** 2) ** 0.5) for x, lf in zip(xs, lift)]
    lower = [(cx + w * x, my - lf + 0.5 * p.mouth_open * a * 2.0 * (1 - x ** 2) ** 0.5) for x, lf in zip(xs, lift)]
    if p.mouth_open > 0.04:
        d.polygon(upper + lower[::-1], fill=(90, 20, 30, 255), outline=dark)
    else:
        d.line(upper, fill=(110, 30, 40, 255), width=3 * lw)
    return img


def _background(rng: np.random.Generator, size: int, clutter: int) -> Image.Image:
    c0 = rng.integers(0, 256, 3)
    c1 = rng.integers(0, 256, 3)
    g = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    if rng.random() < 0.5:
        g = g.transpose(1, 0, 2)
    arr = (c0 * (1 - g) + c1 * g) * np.ones((size, size, 1), np.float32)
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, clutter + 1))):
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.05, 0.5, 2) * size
        kind = rng.integers(0, 3)
        if kind == 0:
            d.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
        elif kind == 1:
            d.ellipse([x0, y0, x0 + w, y0 + h], fill=col)
        else:
            d.line([x0, y0, x0 + w, y0 + h], fill=col, width=max(1, int(size * 0.02)))
    return img


def render_face(p: FaceParams, rng: np.random.Generator, frame: int, face_frac: Tuple[float, float],
                cfg: SynthConfig = SynthConfig(), supersample: int = 2,
                draw_face: bool = True) -> Tuple[Image.Image, Tuple[float, float, float, float]]:
    """Draw face ``p`` into a ``frame``×``frame`` RGB image; the head box's larger side is a fraction in
    ``face_frac`` of the frame, placed at a random position fully inside it.

    Returns ``(image, box)`` with the exact head box ``(x1, y1, x2, y2)`` in output pixels.
    ``draw_face=False`` draws the same frame without the face (the generator is consumed identically):
    tests compare the two to check the box.
    """
    ss = supersample
    big = frame * ss
    frac = rng.uniform(*face_frac)
    theta = math.radians(p.rotation_deg)
    # Head half-extents after rotation for half-width a, half-height a*aspect.
    cos2, sin2 = math.cos(theta) ** 2, math.sin(theta) ** 2
    unit_hw = math.sqrt(cos2 + p.aspect ** 2 * sin2)
    unit_hh = math.sqrt(sin2 + p.aspect ** 2 * cos2)
    a = frac * big / (2 * max(unit_hw, unit_hh))
    hw, hh = a * unit_hw, a * unit_hh
    cx = rng.uniform(hw, big - hw) if big - 2 * hw > 0 else big / 2
    cy = rng.uniform(hh, big - hh) if big - 2 * hh > 0 else big / 2
    layer = _face_layer(p, a)
    layer = layer.rotate(p.rotation_deg, resample=Image.BICUBIC, expand=False)
    bg = _background(rng, big, cfg.clutter)
    half = layer.size[0] / 2
    ox, oy = int(round(cx - half)), int(round(cy - half))
    if draw_face:
        bg.paste(layer, (ox, oy), layer)
    # The layer centre is at (ox + half, oy + half) exactly (even size) -> box in supersampled pixels.
    ccx, ccy = ox + half, oy + half
    box_ss = (ccx - hw, ccy - hh, ccx + hw, ccy + hh)
    img = bg.resize((frame, frame), Image.BILINEAR)
    arr = np.asarray(img).astype(np.float32)
    arr = arr * rng.uniform(0.75, 1.2) + rng.uniform(-20, 20)
    if cfg.noise_std > 0:
        arr = arr + rng.normal(0.0, cfg.noise_std, arr.shape)
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    box = tuple(float(np.clip(v / ss, 0, frame)) for v in box_ss)
    return img, box


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(stream), int(index)])


def write_rafdb(root: str, num_train_per_class: int, num_test_per_class: int, seed: int = 0,
                image_size: int = 100, cfg: SynthConfig = SynthConfig(),
                progress: Optional[Callable[[int, int], None]] = None,
                face_frac: Tuple[float, float] = (0.92, 1.0)) -> Dict[str, int]:
    """Write a labeled synthetic set in RAF-DB's layout under ``root``.

    Files: ``EmoLabel/list_patition_label.txt`` (``train_00001.jpg 5`` — RAF-DB ids 1..7),
    ``Image/aligned/train_00001_aligned.jpg`` (``image_size`` px, the head fills the frame, so the
    RAF-DB convention "box = whole frame" holds) and ``synth_boxes.csv`` (name, canonical class, exact
    head box x1,y1,x2,y2). Classes are balanced and interleaved in random order. Returns counts per split.
    ``progress(done, total)`` is called after each image. ``face_frac``: the head box's larger side as a
    fraction of the frame (default: face-filling); a wider range such as (0.55, 1.0) varies face scale and
    position like real aligned crops do — then build with ``--boxes synth_boxes.csv`` so the shards record
    the true boxes.
    """
    img_dir = os.path.join(root, "Image", "aligned")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "EmoLabel"), exist_ok=True)
    lines: List[str] = []
    boxes: List[Tuple] = []
    counts = {}
    total, done = (num_train_per_class + num_test_per_class) * NUM_CLASSES_7, 0
    for split, per_class, stream in (("train", num_train_per_class, 1), ("test", num_test_per_class, 2)):
        order = np.random.default_rng([seed, stream, 10 ** 6]).permutation(
            np.repeat(np.arange(NUM_CLASSES_7), per_class))
        for i, cls in enumerate(order, start=1):
            rng = _rng(seed, stream, i)
            p = sample_params(rng, int(cls), cfg)
            img, box = render_face(p, rng, image_size, face_frac, cfg)
            name = f"{split}_{i:05d}"
            img.save(os.path.join(img_dir, f"{name}_aligned.jpg"), quality=92)
            lines.append(f"{name}.jpg {canonical_to_rafdb(int(cls))}")
            boxes.append((name, int(cls)) + tuple(round(v, 2) for v in box))
            done += 1
            if progress is not None:
                progress(done, total)
        counts[split] = len(order)
    with open(os.path.join(root, "EmoLabel", "list_patition_label.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "synth_boxes.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "cls", "x1", "y1", "x2", "y2"])
        w.writerows(boxes)
    return counts


def write_identity_folders(root: str, num_identities: int, images_per_identity: int, seed: int = 0,
                           image_size: int = 128, face_frac: Tuple[float, float] = (0.45, 0.9),
                           cfg: Optional[SynthConfig] = None,
                           classes: Sequence[int] = tuple(range(NUM_CLASSES_7)),
                           progress: Optional[Callable[[int, int], None]] = None) -> int:
    """Write an unlabeled synthetic FR-style set in VGGFace2's layout under ``root``.

    ``train/n000001/0001_01.jpg`` … plus ``bb_landmark/loose_bb_train.csv`` (header
    ``NAME_ID,X,Y,W,H``, NAME_ID = ``n000001/0001_01``) with the exact head boxes, and
    ``synth_classes.csv`` (NAME_ID, hidden canonical class) so tests can check pseudo-labels.
    Returns the number of images. ``progress(done, total)`` is called after each image.
    """
    cfg = cfg if cfg is not None else SynthConfig()
    os.makedirs(os.path.join(root, "bb_landmark"), exist_ok=True)
    rows, hidden = [], []
    for ident in range(1, num_identities + 1):
        traits = _identity_traits(_rng(seed, 3, ident))
        d = os.path.join(root, "train", f"n{ident:06d}")
        os.makedirs(d, exist_ok=True)
        for j in range(1, images_per_identity + 1):
            rng = _rng(seed, 4, ident * 100000 + j)
            cls = int(classes[int(rng.integers(0, len(classes)))])
            p = sample_params(rng, cls, cfg, traits=traits)
            img, (x1, y1, x2, y2) = render_face(p, rng, image_size, face_frac, cfg)
            name_id = f"n{ident:06d}/{j:04d}_01"
            img.save(os.path.join(root, "train", name_id + ".jpg"), quality=92)
            rows.append((name_id, round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)))
            hidden.append((name_id, cls))
            if progress is not None:
                progress(len(rows), num_identities * images_per_identity)
    with open(os.path.join(root, "bb_landmark", "loose_bb_train.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["NAME_ID", "X", "Y", "W", "H"])
        w.writerows(rows)
    with open(os.path.join(root, "synth_classes.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["NAME_ID", "cls"])
        w.writerows(hidden)
    return len(rows)
