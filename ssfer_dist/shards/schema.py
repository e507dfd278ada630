"""The sample contract shared by the shard writer (``sharding/``) and the training readers.

A shard is a POSIX tar (WebDataset layout). Every sample is a group of tar members sharing a key:

- ``<key>.jpg``  – RGB JPEG at the build's ``--image-size`` (square).
- ``<key>.cls``  – ASCII decimal canonical class index (labeled sets only; see ``CLASS_NAMES``).
- ``<key>.json`` – UTF-8 JSON object, see :class:`SampleMeta`.

Keys are ``<dataset>/<source id>`` with only ``[A-Za-z0-9_/-]`` characters (no dots: WebDataset
splits member names at the first dot of the basename).

Canonical class order (8 classes, FERPlus order). 7-class sets (RAF-DB, AffectNet-7, FER2013) use
indices 0–6; 8-class sets (FERPlus, AffectNet-8) keep ``contempt`` at 7.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

CLASS_NAMES: Tuple[str, ...] = (
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
)
NUM_CLASSES_7 = 7
NUM_CLASSES_8 = 8
UNLABELED = -1

# Per-channel RGB mean/std (on 0..1 pixels) of face crops, used to normalise the input of every stage
# (pretraining, fine-tuning, evaluation, predict) and stored in exported weights.
FACE_MEAN: Tuple[float, float, float] = (0.588, 0.459, 0.402)
FACE_STD: Tuple[float, float, float] = (0.228, 0.202, 0.190)

# Source label -> canonical index, per source. Index into the tuple with the source's own label id
# (after subtracting the source's first id).
RAFDB_TO_CANONICAL: Tuple[int, ...] = (2, 6, 5, 1, 3, 4, 0)  # RAF-DB 1..7: Sur Fea Dis Hap Sad Ang Neu
AFFECTNET_TO_CANONICAL: Tuple[int, ...] = (0, 1, 3, 2, 6, 5, 4, 7)  # 0..7: Neu Hap Sad Sur Fea Dis Ang Con
FER2013_TO_CANONICAL: Tuple[int, ...] = (4, 5, 6, 1, 3, 2, 0)  # 0..6: Ang Dis Fea Hap Sad Sur Neu
FERPLUS_COLUMNS: Tuple[str, ...] = CLASS_NAMES  # fer2013new.csv columns neutral..contempt = canonical order

# Tar member extensions.
EXT_IMAGE = "jpg"
EXT_CLASS = "cls"
EXT_META = "json"

MANIFEST_NAME = "manifest.parquet"
REPORT_NAME = "report.json"

_KEY_OK = "A-Za-z0-9_/"
_KEY_BAD = re.compile(f"[^{_KEY_OK}-]")
_KEY_BAD_BUT_NEWLINE = re.compile(f"[^{_KEY_OK}\n-]")


def make_key(dataset: str, source_id: str) -> str:
    """A stable, unique WebDataset key ``<dataset>/<source_id>`` with unsafe characters replaced.

    Dots (extensions) are dropped from the source id first, other unsafe characters become ``_``.
    """
    sid = source_id.replace("\\", "/")
    if "." in sid.rsplit("/", 1)[-1]:
        sid = sid[: sid.rfind(".")]
    sid = _KEY_BAD.sub("_", sid).strip("/")
    ds = _KEY_BAD.sub("_", dataset).strip("/")
    if not sid:
        raise ValueError(f"empty source id for dataset {dataset!r}")
    return f"{ds}/{sid}"


def make_keys(dataset: str, source_ids: Sequence[str]) -> List[str]:
    """``[make_key(dataset, s) for s in source_ids]`` with one regex pass over all of them (listings of
    millions of files); ids that need ``make_key``'s slower rules (backslashes, newlines, leading or
    trailing ``/``, nothing left) take the one-by-one path."""
    stems = []
    for sid in source_ids:
        dot = sid.rfind(".")
        stems.append(sid[:dot] if dot > sid.rfind("/") else sid)
    joined = "\n".join(stems)
    if ("\\" in joined or joined.count("\n") != len(stems) - 1
            or not all(st and st[0] != "/" and st[-1] != "/" for st in stems)):
        return [make_key(dataset, s) for s in source_ids]
    ds = _KEY_BAD.sub("_", dataset).strip("/")
    return [f"{ds}/{k}" for k in _KEY_BAD_BUT_NEWLINE.sub("_", joined).split("\n")]


@dataclasses.dataclass(frozen=True)
class SampleMeta:
    """The ``.json`` member of a sample.

    box: face box ``[x1, y1, x2, y2]`` in the *stored* image's pixels (float).
    box_source: ``annotation`` | ``frame`` (pre-aligned crop) | ``haar`` | ``mtcnn`` | ``fallback``.
    orig_size: ``[width, height]`` of the source image before crop/resize.
    """

    source: str
    source_id: str
    box: Tuple[float, float, float, float]
    orig_size: Tuple[int, int]
    box_source: str = "frame"
    identity: Optional[str] = None
    label_orig: Optional[Any] = None
    cls: int = UNLABELED

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["box"] = [round(float(v), 3) for v in self.box]
        d["orig_size"] = [int(v) for v in self.orig_size]
        return json.dumps(d, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str | Dict[str, Any]) -> "SampleMeta":
        d = json.loads(data) if isinstance(data, (bytes, str)) else dict(data)
        missing = [f for f in ("source", "source_id", "box", "orig_size") if f not in d]
        if missing:
            raise ValueError(f"sample json lacks field(s) {missing}")
        box = d["box"]
        if not (isinstance(box, Sequence) and len(box) == 4):
            raise ValueError(f"sample json field 'box' must be [x1,y1,x2,y2], got {box!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["box"] = tuple(float(v) for v in box)
        kw["orig_size"] = tuple(int(v) for v in d["orig_size"])
        return cls(**kw)


def encode_cls(cls: int) -> bytes:
    return str(int(cls)).encode("ascii")


def decode_cls(data: bytes) -> int:
    return int(data.decode("ascii").strip())


def sample_to_members(key: str, jpeg: bytes, meta: SampleMeta) -> Dict[str, Any]:
    """The dict a ``webdataset.TarWriter`` takes for one sample."""
    out: Dict[str, Any] = {"__key__": key, EXT_IMAGE: jpeg, EXT_META: meta.to_json()}
    if meta.cls != UNLABELED:
        out[EXT_CLASS] = encode_cls(meta.cls)
    return out


def class_names(num_classes: int) -> List[str]:
    if num_classes not in (NUM_CLASSES_7, NUM_CLASSES_8):
        raise ValueError(f"num_classes must be 7 or 8, got {num_classes}")
    return list(CLASS_NAMES[:num_classes])
