"""What every source reader yields: :class:`FaceRecord` (a sample to build, not yet loaded) plus the
per-sample problems it already found while listing (missing images, unknown classes, dropped classes).

Readers raise ``UserError`` naming ``file:line`` for *structural* problems (a missing label file, a
wrong CSV header, a line that does not parse); they never raise for a single bad sample.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from ssfer_dist.data.schema import UNLABELED

__all__ = ["FaceRecord", "Listing", "Skipped"]


@dataclasses.dataclass
class FaceRecord:
    """One sample to build.

    load: how to get the encoded image: ``("file", path)``, ``("rec", rec_path, byte_offset)`` or
    ``("pixels", "<space separated uint8>", width, height)``.
    box: face box ``(x1, y1, x2, y2)`` in the source image's pixels, or ``None``.
    box_source: ``annotation`` (box given), ``frame`` (pre-aligned crop: the whole image) or
    ``detect`` (run the build's detector).
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
    """A reader's result: records (any order; the builder sorts by key), per-sample skips, the number
    of canonical classes (0 = unlabeled) and the default dataset name."""

    records: List[FaceRecord]
    skipped: List[Skipped]
    num_classes: int
    dataset: str
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)
