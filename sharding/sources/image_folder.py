"""Image folders: one sub-folder per identity (CASIA-WebFace ``ROOT/0000045/001.jpg``, VGGFace2
``ROOT/train/n000002/0001_01.jpg``), optionally with VGGFace2 ``loose_bb_*.csv`` face boxes.

Identity = the first path component under ``--input`` (none for files directly in it). Without a box
the image goes to the build's detector (``--detector none``: the image is taken as an aligned crop).
"""
from __future__ import annotations

import csv
import glob
import operator
import os
import re
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from sharding.sources.base import CompactRecords, FaceRecord, Listing, Skipped
from sharding.sources.confine import InputRoot
from ssfer_dist.shards.schema import make_keys
from ssfer_dist.errors import UserError

__all__ = ["list_image_folder", "read_loose_bb", "FileSlice", "IMAGE_EXTS"]

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
_BB_HEADER = ["NAME_ID", "X", "Y", "W", "H"]


def _default_name(path: str) -> str:
    base = os.path.basename(os.path.abspath(path).rstrip("/")) or "images"
    return re.sub(r"[^A-Za-z0-9_-]", "_", base)


def read_loose_bb(path: str) -> Dict[str, Tuple[float, float, float, float]]:
    """Read a VGGFace2 ``loose_bb_*.csv`` (header ``NAME_ID,X,Y,W,H``) into
    ``{"n000002/0001_01": (x1, y1, x2, y2)}``. Structural problems raise ``UserError`` with file:line."""
    out: Dict[str, Tuple[float, float, float, float]] = {}
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read box file ({e.strerror or e})") from None
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip().strip('"') for h in header[:5]] != _BB_HEADER:
            raise UserError(f"{path}:1: expected header {','.join(_BB_HEADER)}, got {','.join(header or [])!r}")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 5:
                raise UserError(f"{path}:{lineno}: expected 5 fields NAME_ID,X,Y,W,H, got {len(row)}")
            try:
                x, y, w, h = (float(v) for v in row[1:5])
            except ValueError:
                raise UserError(f"{path}:{lineno}: X,Y,W,H must be numbers, got {row[1:5]}") from None
            out[row[0].strip().strip('"')] = (x, y, x + w, y + h)
    return out


def _find_boxes(root: str) -> Optional[str]:
    root = os.path.abspath(root)
    cands = sorted(glob.glob(os.path.join(root, "bb_landmark", "loose_bb_*.csv")))
    if len(cands) == 1:
        return cands[0]
    sibling = os.path.join(os.path.dirname(root), "bb_landmark", f"loose_bb_{os.path.basename(root)}.csv")
    return sibling if os.path.exists(sibling) else None


class FileSlice(CompactRecords):
    """Image-folder records held as parallel lists (a relative path, key and size per image, boxes as
    an ``(n, 4)`` float array with NaN rows for "no box") instead of a :class:`FaceRecord` each: the
    listing of a 3 M-image VGGFace2 folder stays a few hundred MB, a shard plan pickles in
    microseconds, and the workers make the records as they build."""

    def __init__(self, dataset: str, root_prefix: str, rels: List[str], keys: List[str], sizes, boxes=None):
        self.dataset = dataset
        self.root_prefix = root_prefix  # the input folder with a trailing separator
        self.rels = rels  # paths under the input folder, '/'-separated (the source id)
        self.keys = keys
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.boxes = None if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.rels)

    def _record(self, rel: str, key: str, size: int, box) -> FaceRecord:
        slash = rel.find("/")
        if box is not None:
            box = None if box[0] != box[0] else (float(box[0]), float(box[1]), float(box[2]), float(box[3]))
        path = self.root_prefix + (rel if os.sep == "/" else rel.replace("/", os.sep))
        return FaceRecord(key=key, source=self.dataset, source_id=rel, load=("file", path),
                          identity=rel[:slash] if slash > 0 else None, box=box,
                          box_source="annotation" if box else "detect", size_hint=size)

    def __iter__(self):
        boxes = self.boxes if self.boxes is not None else (None,) * len(self.rels)
        for rel, key, size, box in zip(self.rels, self.keys, self.sizes.tolist(), boxes):
            yield self._record(rel, key, size, box)

    def take(self, idx) -> "FileSlice":
        ix = np.asarray(idx).tolist()
        rels, keys = self.rels, self.keys
        return FileSlice(self.dataset, self.root_prefix, [rels[i] for i in ix], [keys[i] for i in ix],
                         self.sizes[ix], None if self.boxes is None else self.boxes[ix])

    def fingerprint_bytes(self) -> bytes:
        parts = [self.root_prefix, "\0".join(self.rels), "\0".join(self.keys)]
        out = "\n".join(parts).encode("utf-8", "surrogateescape")
        return out + (self.boxes.tobytes() if self.boxes is not None else b"")


def _scan(dirs: List[str], cut: int, root: str, descend: bool = True, confine: Optional[InputRoot] = None):
    """Depth-first, name-sorted listing of the folders ``dirs`` (in that order): ``(rels, sizes, skipped,
    subdirs)``, paths relative to the input folder (``cut`` characters of prefix). With
    ``descend=False`` only the files directly in ``dirs`` are listed and their sub-folders returned.
    Hidden entries (``.x``, ``..jpg``) are skipped and reported; links must point inside ``confine``'s
    folder (else ``outside_input``), a folder link is followed once (again: ``symlink_loop``)."""
    rels: List[str] = []
    sizes: List[int] = []
    skipped: List[Skipped] = []
    below: List[str] = []
    slash_sep = os.sep == "/"
    exts = IMAGE_EXTS
    stack = list(reversed(dirs))
    followed = {os.path.realpath(root)}  # real paths of the folder links followed (and the input itself)
    while stack:  # depth-first, sorted: a stable listing order without os.walk's per-file overhead
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            raise UserError(f"{d}: cannot list folder ({e.strerror or e})") from None
        subdirs = []
        for ent in entries:
            fn = ent.name
            if fn[0] == ".":
                kind = "folder" if ent.is_dir(follow_symlinks=False) else "file"
                skipped.append(Skipped("hidden_file", ent.path, f"hidden {kind} (name starts with '.')"))
                continue
            if ent.is_symlink():
                refused = confine.check_link(ent.path) if confine is not None else None
                if refused:
                    skipped.append(Skipped(refused[0], ent.path, refused[1]))
                    continue
                if ent.is_dir():
                    real = os.path.realpath(ent.path)
                    here = os.path.realpath(d)
                    if real in followed or here == real or here.startswith(os.path.join(real, "")):
                        skipped.append(Skipped("symlink_loop", ent.path, f"link to {real}, already listed"))
                        continue
                    followed.add(real)
            if ent.is_dir():
                if not (d == root and fn == "bb_landmark"):
                    subdirs.append(ent.path)
                continue
            dot = fn.rfind(".")
            ext = fn[dot:].lower() if dot > 0 else ""
            if ext not in exts:
                skipped.append(Skipped("not_an_image_file", ent.path, f"extension {ext or '(none)'!r}"))
                continue
            rel = ent.path[cut:] if slash_sep else ent.path[cut:].replace(os.sep, "/")
            try:
                sizes.append(ent.stat().st_size)
            except OSError:
                sizes.append(0)
            rels.append(rel)
        if descend:
            stack.extend(reversed(subdirs))
        else:
            below.extend(subdirs)
    return rels, sizes, skipped, below


def _scan_chunk(args):
    dirs, cut, root, confine = args
    return _scan(dirs, cut, root, confine=confine)[:3]


def list_image_folder(root: str, *, name: Optional[str] = None, boxes: Optional[str] = None,
                      map_fn: Optional[Callable] = None, allow_outside: bool = False) -> Listing:
    """List every image under ``root`` (recursively), sorted and unique by key, as a :class:`FileSlice`.
    Files with non-image extensions are skipped and counted (``not_an_image_file``); a second file
    with the same key (``a.jpg`` and ``a.png``) is skipped as ``duplicate_key``.

    ``map_fn`` (an ordered ``map``, e.g. the build's worker pool's) lists the identity folders in
    parallel: half the listing time is one ``stat`` per image for its size."""
    if not os.path.isdir(root):
        raise UserError(f"{root}: --format image-folder wants a folder (one sub-folder per identity)")
    dataset = name or _default_name(root)
    box_file = boxes or _find_boxes(root)
    box_map = read_loose_bb(box_file) if box_file else {}
    cut = len(os.path.join(root, ""))
    confine = InputRoot(root, allow_outside)
    rels, sizes, skipped, subdirs = _scan([root], cut, root, descend=False, confine=confine)
    if map_fn is not None and len(subdirs) >= 2:
        n = min(len(subdirs), 16)
        chunks = [subdirs[i * len(subdirs) // n:(i + 1) * len(subdirs) // n] for i in range(n)]
        parts = map_fn(_scan_chunk, [(c, cut, root, confine) for c in chunks])
    else:
        parts = [_scan(subdirs, cut, root, confine=confine)[:3]] if subdirs else []
    for r, sz, sk in parts:
        rels += r
        sizes += sz
        skipped += sk
    if not rels and not skipped:
        raise UserError(f"{root}: no images found (expected ROOT/<identity>/<image>.jpg)")
    nan_box = (float("nan"),) * 4
    box_list = [box_map.get(r[:r.rfind(".")], nan_box) for r in rels] if box_map else []  # keyed without extension
    keys = make_keys(dataset, rels)
    if not all(map(operator.lt, keys, keys[1:])):  # not strictly increasing: sort, drop repeated keys
        order = sorted(range(len(keys)), key=lambda i: (keys[i], rels[i]))
        keep: List[int] = []
        for i in order:
            if keep and keys[keep[-1]] == keys[i]:
                prev = rels[keep[-1]]
                skipped.append(Skipped("duplicate_key", rels[i], f"key {keys[i]} already used by {prev}"))
                continue
            keep.append(i)
        rels, keys, sizes = [rels[i] for i in keep], [keys[i] for i in keep], [sizes[i] for i in keep]
        box_list = [box_list[i] for i in keep] if box_map else box_list
    records = FileSlice(dataset, os.path.join(root, ""), rels, keys, sizes, box_list if box_map else None)
    info = {"boxes": box_file} if box_file else {}
    return Listing(records, skipped, 0, dataset, info)
