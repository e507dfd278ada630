"""``manifest.parquet``: the one index of a shard folder (pure pyarrow; no torch, no ray).

One parquet table, **one row per shard**, written last and atomically by the builder:

====================  ==================  =====================================================
column                type                meaning
====================  ==================  =====================================================
``name``              string              shard file name (``<name>-%06d.tar``)
``url``               string              shard URL at build time (readers re-resolve it against
                                          the manifest's folder, so a copied folder still works)
``num_samples``       int64               samples in the shard
``num_bytes``         int64               tar size in bytes
``sha256``            string              hex sha256 of the tar
``class_hist``        list<int64>         samples per canonical class (empty when unlabeled)
``keys``              list<string>        the per-sample index: sample keys in tar order
``classes``           list<int16>         canonical class per key (-1 when unlabeled)
====================  ==================  =====================================================

Dataset-level facts live in the parquet schema metadata (``ssfer.*`` keys): dataset name, image size,
number of classes, class names, role (``all`` | ``labeled`` | ``unlabeled``) and the build parameters.
Nothing time- or machine-dependent is stored, so two builds with the same inputs and seed give
byte-identical manifests.

pyarrow is imported inside the functions that need it, so shard-building worker processes (which
only use ``ShardInfo``) start fast.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
from typing import Any, Dict, List, Optional, Sequence

from ssfer_dist import storage
from ssfer_dist.shards.schema import CLASS_NAMES, MANIFEST_NAME, UNLABELED
from ssfer_dist.errors import UserError

__all__ = ["ShardInfo", "Manifest", "read_manifest", "write_manifest", "manifest_url", "folder_of",
           "MANIFEST_VERSION"]

log = logging.getLogger(__name__)

MANIFEST_VERSION = "1"



def _schema():
    import pyarrow as pa

    return pa.schema([
        ("name", pa.string()),
        ("url", pa.string()),
        ("num_samples", pa.int64()),
        ("num_bytes", pa.int64()),
        ("sha256", pa.string()),
        ("class_hist", pa.list_(pa.int64())),
        ("keys", pa.list_(pa.string())),
        ("classes", pa.list_(pa.int16())),
    ])


_SHARD_COLUMNS = ["name", "url", "num_samples", "num_bytes", "sha256", "class_hist"]


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One shard row of the manifest. ``keys``/``classes`` are the per-sample index (may be empty
    when the manifest was read without the index)."""

    name: str
    url: str
    num_samples: int
    num_bytes: int
    sha256: str
    class_hist: List[int]
    keys: List[str] = dataclasses.field(default_factory=list, repr=False, compare=False)
    classes: List[int] = dataclasses.field(default_factory=list, repr=False, compare=False)


def folder_of(url: str) -> str:
    """The shard folder for a folder URL or a ``.../manifest.parquet`` URL."""
    u = str(url).rstrip("/")
    if u.endswith("/" + MANIFEST_NAME) or u == MANIFEST_NAME:
        u = u[: -len(MANIFEST_NAME)].rstrip("/") or "."
    return u


def manifest_url(url: str) -> str:
    """``<folder>/manifest.parquet`` for a folder or manifest URL."""
    return storage.join(folder_of(url), MANIFEST_NAME)


class Manifest:
    """A read manifest: ``.url`` (folder), ``.shards``, ``.num_samples``, ``.num_classes`` (0 when
    unlabeled), ``.class_names``, ``.image_size``, ``.dataset``, ``.meta`` (all ``ssfer.*`` metadata)."""

    def __init__(self, url: str, shards: List[ShardInfo], meta: Dict[str, Any]):
        self.url = folder_of(url)
        self.shards = shards
        self.meta = meta

    @property
    def num_samples(self) -> int:
        return int(sum(s.num_samples for s in self.shards))

    @property
    def num_bytes(self) -> int:
        return int(sum(s.num_bytes for s in self.shards))

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", 0))

    @property
    def class_names(self) -> List[str]:
        return list(self.meta.get("class_names", []))

    @property
    def image_size(self) -> int:
        return int(self.meta.get("image_size", 0))

    @property
    def dataset(self) -> str:
        return str(self.meta.get("dataset", ""))

    @property
    def role(self) -> str:
        return str(self.meta.get("role", "all"))

    def class_hist(self) -> List[int]:
        """Samples per class over all shards (empty when unlabeled)."""
        n = self.num_classes
        out = [0] * n
        for s in self.shards:
            for i, c in enumerate(s.class_hist[:n]):
                out[i] += int(c)
        return out

    def shard_urls(self) -> List[str]:
        """Full URLs/paths of every shard, in manifest order."""
        return [s.url for s in self.shards]

    def index(self) -> "pa.Table":  # noqa: F821
        """The per-sample index: a table with columns ``key`` (string), ``shard`` (shard name), ``cls``
        (int16, -1 when unlabeled), in shard order then tar order."""
        import pyarrow as pa

        keys: List[str] = []
        shard: List[str] = []
        cls: List[int] = []
        for s in self.shards:
            keys.extend(s.keys)
            shard.extend([s.name] * len(s.keys))
            cls.extend(s.classes)
        return pa.table({"key": pa.array(keys, pa.string()), "shard": pa.array(shard, pa.string()),
                         "cls": pa.array(cls, pa.int16())})

    def __repr__(self) -> str:
        return (f"Manifest({self.url!r}, dataset={self.dataset!r}, shards={len(self.shards)}, "
                f"samples={self.num_samples}, classes={self.num_classes}, image_size={self.image_size})")


def _meta_to_schema(meta: Dict[str, Any]) -> Dict[bytes, bytes]:
    out = {b"ssfer.version": MANIFEST_VERSION.encode()}
    for k in sorted(meta):
        out[f"ssfer.{k}".encode()] = json.dumps(meta[k], sort_keys=True).encode()
    return out


def manifest_bytes(shards: Sequence[ShardInfo], meta: Dict[str, Any]) -> bytes:
    """Serialise a manifest to parquet bytes (deterministic for equal inputs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = sorted(shards, key=lambda s: s.name)
    cols = {
        "name": [s.name for s in shards],
        "url": [s.url for s in shards],
        "num_samples": [int(s.num_samples) for s in shards],
        "num_bytes": [int(s.num_bytes) for s in shards],
        "sha256": [s.sha256 for s in shards],
        "class_hist": [[int(c) for c in s.class_hist] for s in shards],
        "keys": [list(s.keys) for s in shards],
        "classes": [[int(c) for c in s.classes] for s in shards],
    }
    table = pa.table(cols, schema=_schema()).replace_schema_metadata(_meta_to_schema(meta))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_manifest(folder: str, shards: Sequence[ShardInfo], *, dataset: str, image_size: int, num_classes: int,
                   role: str = "all", extra: Optional[Dict[str, Any]] = None) -> str:
    """Write ``<folder>/manifest.parquet`` atomically; returns its URL.

    ``num_classes`` is 0 for unlabeled sets; class names follow the canonical order of
    ``ssfer_dist.shards.schema.CLASS_NAMES``.
    """
    meta: Dict[str, Any] = dict(extra or {})
    meta.update(dataset=dataset, image_size=int(image_size), num_classes=int(num_classes),
                class_names=list(CLASS_NAMES[:num_classes]) if num_classes else [], role=role,
                num_shards=len(shards), num_samples=int(sum(s.num_samples for s in shards)))
    url = manifest_url(folder)
    storage.put_bytes(url, manifest_bytes(shards, meta))
    log.info("wrote %s (%d shards, %d samples)", url, len(shards), meta["num_samples"])
    return url


def read_manifest(url: str, with_index: bool = True) -> Manifest:
    """Read ``<url>/manifest.parquet`` (``url`` is the shard folder or the manifest itself).

    Raises ``UserError`` naming the URL when the manifest is missing or not a valid manifest.
    ``with_index=False`` skips the per-sample key/class columns (fast for very large sets;
    ``Manifest.index()`` is then empty).
    """
    import pyarrow.parquet as pq

    folder = folder_of(url)
    murl = manifest_url(folder)
    try:
        data = storage.get_bytes(murl)
    except UserError as e:
        raise UserError(f"{murl}: no shard manifest here ({e}); build one with `ssfer-shard build`") from None
    try:
        pf = pq.ParquetFile(io.BytesIO(data))
        raw_meta = pf.schema_arrow.metadata or {}
        cols = list(_SHARD_COLUMNS) + (["keys", "classes"] if with_index else [])
        missing = [c for c in cols if c not in pf.schema_arrow.names]
        if missing or b"ssfer.version" not in raw_meta:
            raise ValueError(f"missing column(s) {missing}" if missing else "missing ssfer.* metadata")
        table = pf.read(columns=cols)
        meta = {k.decode()[len("ssfer."):]: json.loads(v) for k, v in raw_meta.items()
                if k.startswith(b"ssfer.") and k != b"ssfer.version"}
    except UserError:
        raise
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{murl}: not a valid shard manifest ({why})") from None
    d = table.to_pydict()
    shards = []
    for i, name in enumerate(d["name"]):
        shards.append(ShardInfo(
            name=name, url=storage.join(folder, name), num_samples=int(d["num_samples"][i]),
            num_bytes=int(d["num_bytes"][i]), sha256=d["sha256"][i], class_hist=[int(c) for c in d["class_hist"][i]],
            keys=list(d["keys"][i]) if with_index else [],
            classes=[int(c) for c in d["classes"][i]] if with_index else []))
    m = Manifest(folder, shards, meta)
    if with_index:
        for s in shards:
            if len(s.keys) != s.num_samples or len(s.classes) != s.num_samples:
                raise UserError(f"{murl}: shard {s.name} has {s.num_samples} samples but an index of {len(s.keys)}")
    return m


def class_hist_of(classes: Sequence[int], num_classes: int) -> List[int]:
    """Histogram of canonical classes (``UNLABELED`` ignored); empty when ``num_classes`` is 0."""
    out = [0] * num_classes
    for c in classes:
        if c != UNLABELED and 0 <= c < num_classes:
            out[c] += 1
    return out
