"""RAF-DB basic: ``EmoLabel/list_patition_label.txt`` (lines ``train_00001.jpg 5``, labels 1-7 =
Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral) and aligned images
``Image/aligned/train_00001_aligned.jpg`` (100x100, face fills the frame -> box = whole frame).
Split by the name prefix ``train_`` / ``test_``. ``--boxes CSV`` (columns ``name,x1,y1,x2,y2``; name =
``train_00001`` or ``train_00001.jpg``, box in the aligned image's pixels; the synthetic demo set writes
``synth_boxes.csv``) records face boxes while the aligned frame stays the stored image; ``--detector``
detects them instead."""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional, Tuple

from sharding.sources.base import FaceRecord, Listing, Skipped
from sharding.sources.confine import InputRoot
from ssfer_dist.shards.schema import RAFDB_TO_CANONICAL, make_key
from ssfer_dist.errors import UserError

__all__ = ["list_rafdb", "LABEL_FILE"]

LABEL_FILE = os.path.join("EmoLabel", "list_patition_label.txt")


def read_box_csv(path: str) -> Dict[str, Tuple[float, float, float, float]]:
    """``name -> (x1, y1, x2, y2)`` from a CSV with columns name, x1, y1, x2, y2 (others ignored); names are
    stored without an extension."""
    out: Dict[str, Tuple[float, float, float, float]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.DictReader(f)
            need = {"name", "x1", "y1", "x2", "y2"}
            if not need <= set(rows.fieldnames or ()):
                raise UserError(f"--boxes {path}: expected columns {sorted(need)}, got {rows.fieldnames}")
            for lineno, r in enumerate(rows, start=2):
                try:
                    out[os.path.splitext(r["name"])[0]] = tuple(float(r[k]) for k in ("x1", "y1", "x2", "y2"))
                except (TypeError, ValueError):
                    raise UserError(f"--boxes {path}:{lineno}: box values must be numbers") from None
    except FileNotFoundError:
        raise UserError(f"--boxes {path}: file not found") from None
    return out


def list_rafdb(root: str, *, split: str, name: Optional[str] = None, allow_outside: bool = False,
               boxes: Optional[str] = None) -> Listing:
    """List RAF-DB basic samples of ``split`` (train | test | all) with canonical classes. ``boxes``: a
    face-box CSV (module docstring); images it does not name keep the frame box."""
    if split not in ("train", "test", "all"):
        raise UserError(f"--split {split}: RAF-DB has train and test (or all)")
    dataset = name or "rafdb"
    label_file = os.path.join(root, LABEL_FILE)
    if not os.path.exists(label_file):
        raise UserError(f"{label_file}: RAF-DB label file missing "
                        "(expected EmoLabel/list_patition_label.txt under --input)")
    img_dir = os.path.join(root, "Image", "aligned")
    box_of = read_box_csv(boxes) if boxes else {}
    confine = InputRoot(root, allow_outside)
    records: List[FaceRecord] = []
    skipped: List[Skipped] = []
    with open(label_file, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            s = line.strip()
            if not s:
                continue
            parts = s.split()
            where = f"{label_file}:{lineno}"
            if len(parts) != 2:
                raise UserError(f"{where}: expected '<name>.jpg <label 1-7>', got {s[:80]!r}")
            fname, lab = parts
            try:
                label = int(lab)
            except ValueError:
                raise UserError(f"{where}: label must be an integer 1-7, got {lab!r}") from None
            stem = os.path.splitext(fname)[0]
            if not (stem.startswith("train_") or stem.startswith("test_")):
                raise UserError(f"{where}: image name must start with train_ or test_, got {fname!r}")
            if split != "all" and not stem.startswith(split + "_"):
                continue
            if not 1 <= label <= len(RAFDB_TO_CANONICAL):
                skipped.append(Skipped("unknown_class", where, f"label {label} not in 1-7"))
                continue
            path = os.path.join(img_dir, f"{stem}_aligned.jpg")
            refused = confine.check_named(fname, path)
            if refused:
                skipped.append(Skipped(refused[0], where, refused[1]))
                continue
            if not os.path.exists(path):
                skipped.append(Skipped("missing_image", where, path))
                continue
            box = box_of.get(stem)
            records.append(FaceRecord(
                key=make_key(dataset, stem), source=dataset, source_id=fname, load=("file", path),
                cls=RAFDB_TO_CANONICAL[label - 1], label_orig=label, box=box,
                box_source="annotation" if box is not None else "frame", aligned=True,
                size_hint=os.path.getsize(path)))
    return Listing(records, skipped, 7, dataset)
