"""What every source reader yields: :class:`FaceRecord` (a sample to build, not yet loaded) plus the
per-sample problems it already found while listing (missing images, unknown classes, dropped classes).

Readers raise ``UserError`` naming ``file:line`` for *structural* problems (a missing label file, a
wrong CSV header, a line that does not parse); they never raise for a single bad sample.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from ssfer_dist.shards.schema import UNLABELED

__all__ = ["FaceRecord", "Listing", "Skipped", "CompactRecords", "RecordSlice"]


@dataclasses.dataclass(slots=True)
class FaceRecord:
    """One sample to build.

    load: how to get the encoded image: ``("file", path)``, ``("rec", rec_path, byte_offset)`` or
    ``("pixels", "<space separated uint8>", width, height)``.
    box: face box ``(x1, y1, x2, y2)`` in the source image's pixels, or ``None``.
    box_source: ``annotation`` (box given), ``frame`` (pre-aligned crop: the whole image) or
    ``detect`` (run the build's detector). ``frame`` records built with ``--detector`` get the detector's box
    (a centred fallback box where it finds none, counted) and keep their whole frame.
    aligned: a pre-aligned crop whose ``annotation`` box is only recorded: the stored image is the whole
    frame, not a crop around the box (RAF-DB aligned with ``--boxes``).
    size_hint: approximate encoded size in bytes (for ``--max-shard-bytes`` planning).
    """

    key: str
    source: str
    source_id: str
    load: Tuple[Any, ...]
    cls: int = UNLABELED
    label_orig: Any = None
    identity: Optional[str] = None
    box: Optional[Tuple[float, float, float, float]] = None
    box_source: str = "frame"
    size_hint: int = 0
    aligned: bool = False


@dataclasses.dataclass
class Skipped:
    """A sample left out while listing or building: ``reason`` is a short slug, ``item`` names the
    source file (and line) or key."""

    reason: str
    item: str
    detail: str = ""

    def as_dict(self) -> Dict[str, str]:
        return {"reason": self.reason, "item": self.item, "detail": self.detail}


@dataclasses.dataclass
class Listing:
    """A reader's result: records (any order; the builder sorts by key) or a compact
    :class:`RecordSlice` (unique keys, planned without Python objects), per-sample skips, the number
    of canonical classes (0 = unlabeled) and the default dataset name."""

    records: Any
    skipped: List[Skipped]
    num_classes: int
    dataset: str
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)


class CompactRecords:
    """A run of records held as arrays rather than one :class:`FaceRecord` object each, for the
    sources of the big unlabeled corpora (42 M images). Sorted and unique by key. The builder plans
    shards from ``sizes`` / ``take`` / ``fingerprint_bytes`` and ships the slices to the workers, which
    turn them into :class:`FaceRecord` objects one at a time on iteration."""

    sizes: Any  # np.ndarray[int64], the encoded sizes (``size_hint``)

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self):
        raise NotImplementedError

    def take(self, idx) -> "CompactRecords":
        """The records at positions ``idx`` (a numpy index array), in that order."""
        raise NotImplementedError

    def fingerprint_bytes(self) -> bytes:
        """Bytes that change whenever any record (what it loads, its key, box) changes."""
        raise NotImplementedError


class RecordSlice(CompactRecords):
    """A compact, picklable run of insightface records (numpy key/offset arrays) that yields
    :class:`FaceRecord` objects on iteration — what a shard plan carries for ``.rec`` sources, so a
    42 M-image corpus is planned in ~16 bytes per image instead of a Python object each."""

    def __init__(self, dataset: str, rec_path: str, keys, offsets, sizes=None):
        import numpy as np

        self.dataset = dataset
        self.rec_path = rec_path
        self.keys = np.asarray(keys, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.zeros(len(self.keys), np.int64) if sizes is None else np.asarray(sizes, dtype=np.int64)

    def __len__(self) -> int:
        return int(len(self.keys))

    def record(self, i: int) -> FaceRecord:
        k = str(int(self.keys[i]))
        return FaceRecord(key=f"{self.dataset}/{k}", source=self.dataset, source_id=k,
                          load=("rec", self.rec_path, int(self.offsets[i])), box_source="frame",
                          size_hint=int(self.sizes[i]))

    def __iter__(self):
        for i in range(len(self.keys)):
            yield self.record(i)

    def take(self, idx) -> "RecordSlice":
        """The records at positions ``idx`` (a numpy index array or slice), in that order."""
        return RecordSlice(self.dataset, self.rec_path, self.keys[idx], self.offsets[idx], self.sizes[idx])

    def fingerprint_bytes(self) -> bytes:
        return self.rec_path.encode() + self.keys.tobytes() + self.offsets.tobytes()
