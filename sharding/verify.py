"""``ssfer-shard verify``: re-read every shard named by the manifest and list every problem.

Checks per shard: it exists, its size and sha256 match the manifest, the tar parses, its sample
count, key order and class histogram match the manifest. Per sample: ``jpg`` decodes to an RGB
``image_size`` square, ``json`` is a valid ``SampleMeta`` whose box lies in the frame, ``cls`` is
present exactly for labeled sets, in range and equal to the json's, keys are unique across shards.
"""
from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from typing import Any, Dict, List, Tuple

from ssfer_dist import storage
from ssfer_dist.shards.manifest import class_hist_of, read_manifest
from ssfer_dist.shards.safeimage import open_image
from ssfer_dist.shards.schema import EXT_CLASS, EXT_IMAGE, EXT_META, SampleMeta, decode_cls
from ssfer_dist.shards.tario import DEFAULT_MAX_MEMBER_BYTES, MemberProblem, iter_tar_samples

__all__ = ["verify"]

log = logging.getLogger(__name__)


class _HashingReader(io.RawIOBase):
    def __init__(self, raw):
        self.raw = raw
        self.h = hashlib.sha256()
        self.n = 0

    def readable(self):
        return True

    def readinto(self, b):
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.h.update(data)
        self.n += n
        return n

    def drain(self):
        while True:
            d = self.raw.read(1 << 20)
            if not d:
                return
            self.h.update(d)
            self.n += len(d)


def _check_sample(key: str, s: Dict[str, bytes], num_classes: int, size: int) -> Tuple[List[str], int]:
    probs: List[str] = []
    cls = -1
    extra = sorted(set(s) - {EXT_IMAGE, EXT_META, EXT_CLASS})
    if extra:
        probs.append(f"unexpected member(s) {extra}")
    if EXT_IMAGE not in s:
        probs.append("no jpg member")
    else:
        try:
            img = open_image(s[EXT_IMAGE])          # header checked before any pixel is decoded
            if img.format != "JPEG" or img.mode != "RGB" or img.size != (size, size):
                probs.append(f"jpg is {img.format} {img.mode} {img.size[0]}x{img.size[1]}, "
                             f"expected JPEG RGB {size}x{size}")
            else:
                img.load()
        except Exception as e:
            probs.append(f"jpg does not decode ({type(e).__name__}: {e})")
    if num_classes > 0:
        if EXT_CLASS not in s:
            probs.append("labeled set but no cls member")
        else:
            try:
                cls = decode_cls(s[EXT_CLASS])
                if not 0 <= cls < num_classes:
                    probs.append(f"cls {cls} outside 0..{num_classes - 1}")
            except ValueError:
                probs.append(f"cls {s[EXT_CLASS][:20]!r} is not an integer")
    elif EXT_CLASS in s:
        probs.append("unlabeled set but a cls member is present")
    if EXT_META not in s:
        probs.append("no json member")
    else:
        try:
            meta = SampleMeta.from_json(s[EXT_META])
            if num_classes > 0 and meta.cls != cls:
                probs.append(f"json cls {meta.cls} != cls member {cls}")
            x1, y1, x2, y2 = meta.box
            if not (0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size):
                probs.append(f"json box {list(meta.box)} not inside the {size}x{size} frame")
        except Exception as e:
            probs.append(f"json invalid ({e})")
    return probs, cls


def verify(url: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Tuple[List[str], Dict[str, Any]]:
    """Verify the shard folder ``url``; returns ``(problems, stats)`` (problems empty when all is well).
    Unsafe members (``../`` or absolute names, links, devices) and members over ``max_member_bytes`` are
    problems; they are never loaded."""
    m = read_manifest(url)
    problems: List[str] = []
    seen: Dict[str, str] = {}
    total = 0
    for sh in m.shards:
        where = sh.url
        try:
            stream = storage.open_read(sh.url)
        except storage.StorageError as e:
            problems.append(f"{where}: cannot open ({e})")
            continue
        reader = _HashingReader(stream)
        keys: List[str] = []
        classes: List[int] = []
        refused: List[MemberProblem] = []
        try:
            for key, sample in iter_tar_samples(io.BufferedReader(reader, 1 << 20), max_member_bytes, refused):
                keys.append(key)
                if key in seen:
                    problems.append(f"{where}: {key}: duplicate key (also in {seen[key]})")
                seen[key] = sh.name
                probs, cls = _check_sample(key, sample, m.num_classes, m.image_size)
                classes.append(cls)
                problems.extend(f"{where}: {key}: {p}" for p in probs)
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"{where}: tar does not parse ({type(e).__name__}: {e})")
        problems.extend(f"{where}: {p}" for p in refused)
        reader.drain()
        stream.close()
        total += len(keys)
        if reader.n != sh.num_bytes:
            problems.append(f"{where}: {reader.n} bytes, manifest says {sh.num_bytes}")
        if reader.h.hexdigest() != sh.sha256:
            problems.append(f"{where}: sha256 {reader.h.hexdigest()} != manifest {sh.sha256}")
        if len(keys) != sh.num_samples:
            problems.append(f"{where}: {len(keys)} samples, manifest says {sh.num_samples}")
        elif keys != sh.keys:
            problems.append(f"{where}: sample keys differ from the manifest index")
        if m.num_classes and class_hist_of(classes, m.num_classes) != list(sh.class_hist):
            hist = class_hist_of(classes, m.num_classes)
            problems.append(f"{where}: class histogram {hist} != manifest {sh.class_hist}")
    return problems, {"num_shards": len(m.shards), "num_samples": total}
