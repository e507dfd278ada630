"""Source readers, one per on-disk format; ``list_source`` dispatches on ``--format``."""
from __future__ import annotations

import os
from typing import Callable, Optional

from sharding.sources.affectnet import list_affectnet
from sharding.sources.base import FaceRecord, Listing, Skipped
from sharding.sources.ferplus import list_ferplus
from sharding.sources.image_folder import list_image_folder
from sharding.sources.insightface import list_rec
from sharding.sources.rafdb import list_rafdb
from ssfer_dist.errors import UserError

__all__ = ["FORMATS", "list_source", "FaceRecord", "Listing", "Skipped"]

FORMATS = ("image-folder", "insightface-rec", "rafdb", "affectnet", "ferplus")


def list_source(fmt: str, input_path: str, *, split: str, name: Optional[str] = None, num_classes: int = 7,
                boxes: Optional[str] = None, map_fn: Optional[Callable] = None, allow_outside: bool = False) -> Listing:
    """List the samples of ``input_path`` in format ``fmt`` (see ``FORMATS``) for ``split``
    (``train`` | ``val`` | ``test`` | ``all``). ``name`` overrides the dataset name used in keys;
    ``num_classes`` picks AffectNet's 7- or 8-class protocol; ``boxes`` is an optional VGGFace2
    ``loose_bb`` CSV for image folders, or a ``name,x1,y1,x2,y2`` CSV for RAF-DB's aligned images;
    ``map_fn``, an ordered parallel ``map`` (the build's worker
    pool), lets a reader list in parallel (image folders do). Paths from label files and links must resolve
    inside ``input_path`` unless ``allow_outside`` (``sharding/sources/confine.py``)."""
    if not os.path.exists(input_path):
        raise UserError(f"{input_path}: input does not exist")
    if fmt == "image-folder":
        return list_image_folder(input_path, name=name, boxes=boxes, map_fn=map_fn, allow_outside=allow_outside)
    if fmt == "insightface-rec":
        return list_rec(input_path, name=name)
    if fmt == "rafdb":
        return list_rafdb(input_path, split=split, name=name, allow_outside=allow_outside, boxes=boxes)
    if fmt == "affectnet":
        return list_affectnet(input_path, split=split, name=name, num_classes=num_classes,
                              allow_outside=allow_outside)
    if fmt == "ferplus":
        return list_ferplus(input_path, split=split, name=name)
    raise UserError(f"unknown --format {fmt!r}; expected one of {', '.join(FORMATS)}")
