"""insightface MXNet RecordIO (``train.rec`` + ``train.idx`` + ``property``), pure Python (no mxnet).

Chunk layout: u32 magic 0xCED7230A, u32 lrec (cflag = lrec >> 29, length = lrec & (2^29 - 1)), the
bytes, zero padding to 4 bytes. cflag 0 = a whole record; 1/2/3 = first/middle/last part of a record
the writer split at each 4-byte-aligned occurrence of the magic (those 4 bytes were dropped, so the
reader puts the magic back between parts). Payload = ``<IfQQ`` header (flag, label, id, id2), then
``float32[flag]`` labels when flag > 0, then the encoded image.

Old-style files: record 0 has flag 2 and labels ``[A, B]`` and no image: images are keys ``1..A-1``,
keys ``A..B-1`` are identity records. New-style files: every key of the ``.idx`` is an image.
Images are 112x112 aligned crops, so the face box is the whole frame.
"""
from __future__ import annotations

import glob
import os
import re
import struct
from typing import BinaryIO, Dict, List, Optional, Tuple

import numpy as np

from sharding.sources.base import Listing, RecordSlice
from ssfer_dist.shards.schema import make_key
from ssfer_dist.errors import UserError

__all__ = ["MAGIC", "RecError", "read_record", "unpack_payload", "list_rec", "read_idx"]

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_HEADER = struct.Struct("<IfQQ")


class RecError(ValueError):
    """A record that cannot be read (bad magic, truncated chunk, bad part sequence)."""


def read_record(f: BinaryIO, offset: int) -> bytes:
    """Read the (possibly multi-part) record whose first chunk starts at ``offset``."""
    f.seek(offset)
    parts: List[bytes] = []
    first = True
    while True:
        pos = f.tell()
        head = f.read(8)
        if len(head) < 8:
            raise RecError(f"truncated chunk header at byte {pos}")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecError(f"bad magic 0x{magic:08x} at byte {pos} (expected 0x{MAGIC:08x})")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        if first and cflag not in (0, 1):
            raise RecError(f"record at byte {pos} starts with a continuation chunk (cflag {cflag})")
        if not first and cflag not in (2, 3):
            raise RecError(f"multi-part record broken at byte {pos} (cflag {cflag} after a first part)")
        data = f.read(length)
        if len(data) < length:
            raise RecError(f"truncated record at byte {pos}: {len(data)} of {length} bytes")
        pad = (-length) % 4
        if pad:
            f.seek(pad, os.SEEK_CUR)
        parts.append(data)
        if cflag in (0, 3):
            break
        parts.append(MAGIC_BYTES)
        first = False
    return b"".join(parts)


def unpack_payload(payload: bytes) -> Tuple[int, float, Optional[np.ndarray], bytes]:
    """``(flag, label, label_array or None, image_bytes)`` of a record payload."""
    if len(payload) < _HEADER.size:
        raise RecError(f"record payload of {len(payload)} bytes is shorter than its 24-byte header")
    flag, label, _id, _id2 = _HEADER.unpack_from(payload)
    off = _HEADER.size
    labels = None
    if flag > 0:
        end = off + 4 * flag
        if end > len(payload):
            raise RecError(f"record header says {flag} labels but the payload is only {len(payload)} bytes")
        labels = np.frombuffer(payload, dtype="<f4", count=flag, offset=off).copy()
        off = end
    return flag, float(label), labels, payload[off:]


def record_class(label: float, labels: Optional[np.ndarray]) -> float:
    """The identity label: the scalar label, or ``labels[0]`` for a label array."""
    return float(labels[0]) if labels is not None and len(labels) else float(label)


def read_idx(path: str) -> List[Tuple[int, int]]:
    """``[(key, offset)]`` from a ``.idx`` file (lines ``key<TAB>offset``), in file order."""
    out: List[Tuple[int, int]] = []
    try:
        f = open(path, "r", encoding="ascii", errors="replace")
    except OSError as e:
        raise UserError(f"{path}: cannot read index ({e.strerror or e})") from None
    with f:
        for lineno, line in enumerate(f, start=1):
            s = line.strip()
            if not s:
                continue
            parts = s.split()
            if len(parts) != 2:
                raise UserError(f"{path}:{lineno}: expected 'key<TAB>offset', got {s[:60]!r}")
            try:
                out.append((int(parts[0]), int(parts[1])))
            except ValueError:
                raise UserError(f"{path}:{lineno}: key and offset must be integers, got {s[:60]!r}") from None
    if not out:
        raise UserError(f"{path}: index is empty")
    return out


def _locate(path: str) -> Tuple[str, str, Optional[str]]:
    if os.path.isdir(path):
        rec = os.path.join(path, "train.rec")
        if not os.path.exists(rec):
            cands = sorted(glob.glob(os.path.join(path, "*.rec")))
            if len(cands) != 1:
                raise UserError(f"{path}: expected train.rec (or exactly one .rec file) in this folder")
            rec = cands[0]
    else:
        rec = path
    if not rec.endswith(".rec"):
        raise UserError(f"{rec}: --format insightface-rec wants a .rec file or its folder")
    idx = rec[:-4] + ".idx"
    if not os.path.exists(idx):
        raise UserError(f"{idx}: missing (the .idx next to {os.path.basename(rec)} is needed to find records)")
    prop = os.path.join(os.path.dirname(rec), "property")
    return rec, idx, prop if os.path.exists(prop) else None


def _is_identity_record(f: BinaryIO, offset: int) -> bool:
    flag, _l, _labels, img = unpack_payload(read_record(f, offset))
    return flag == 2 and len(img) == 0


def list_rec(path: str, *, name: Optional[str] = None) -> Listing:
    """List the image records of an insightface ``.rec`` (old- or new-style header)."""
    rec, idx_path, prop = _locate(path)
    dataset = name or re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(os.path.dirname(os.path.abspath(rec)))) or "rec"
    entries = read_idx(idx_path)
    offsets: Dict[int, int] = dict(entries)
    size = os.path.getsize(rec)
    info: Dict[str, object] = {"rec": rec, "idx": idx_path}
    if prop:
        with open(prop, encoding="utf-8", errors="replace") as pf:
            first = pf.readline().strip().split(",")
        try:
            info["property_num_classes"] = int(first[0])
        except (ValueError, IndexError):
            raise UserError(f"{prop}:1: expected 'num_classes,112,112', got {','.join(first)!r}") from None
    keys = [k for k, _ in entries]
    style = "new"
    with open(rec, "rb") as f:
        if 0 in offsets:
            try:
                flag, _label, labels, img = unpack_payload(read_record(f, offsets[0]))
            except RecError as e:
                raise UserError(f"{rec}: record 0 (byte {offsets[0]}): {e}") from None
            if flag == 2 and len(img) == 0 and labels is not None:
                style = "old"
                a, b = float(labels[0]), float(labels[1])
                info["header"] = [a, b]
                ulp = float(np.spacing(np.float32(a))) if a >= 2 ** 24 else 0.0
                keep = []
                for k in keys:
                    if k < 1 or k >= a + ulp:
                        continue
                    if k >= a - ulp and _is_identity_record(f, offsets[k]):
                        continue  # float32 rounding near A: trust the record itself
                    keep.append(k)
                keys = keep
    info["style"] = style
    dataset = make_key(dataset, "x").rsplit("/", 1)[0]
    key_arr = np.asarray(keys, dtype=np.int64)
    if len(np.unique(key_arr)) != len(key_arr):
        raise UserError(f"{idx_path}: the same key appears on more than one line")
    off_arr = np.asarray([offsets[k] for k in keys], dtype=np.int64)
    ordered = np.sort(np.fromiter(offsets.values(), dtype=np.int64, count=len(offsets)))
    nxt = np.append(ordered[1:], size)
    sizes = np.maximum(0, nxt[np.searchsorted(ordered, off_arr)] - off_arr - 32)
    order = np.argsort(key_arr, kind="stable")
    records = RecordSlice(dataset, rec, key_arr[order], off_arr[order], sizes[order])
    return Listing(records, [], 0, dataset, info)
