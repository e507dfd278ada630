"""Shard writing: one worker builds one whole shard, start to finish.

``build_shard(plan, cfg)`` loads + processes the plan's records in order, writes them as WebDataset
tar members (``SampleTarWriter``; fixed mtime/owner so equal inputs give byte-identical tars) to a
temporary file, hashes it, and only then publishes it under its final name:

- local output: the temporary file lives in the output folder under a hidden ``.tmp-`` name and is
  ``os.replace``-d onto the final name (atomic, no copy);
- S3 output: the temporary file is local and goes up with ``ssfer_dist.storage.put_file`` (a PUT or a
  completed multipart upload is visible whole or not at all).

After the shard is published a small sidecar ``_build/<shard>.json`` records its ShardInfo, the
plan's fingerprint and the per-sample skips. A rerun trusts a shard only when its sidecar's
fingerprint matches the new plan and the shard's size (and, for local shards, sha256) match.
Once the manifest is written the sidecars are merged into one hidden ``.build-state.json`` (what a
rerun of a finished build resumes from) and ``_build/`` is removed: finished output holds shards,
``report.json`` and ``manifest.parquet`` only.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from sharding.process import ProcessOptions, SkipSample, pixels_to_image, process_image
from sharding.sources.base import FaceRecord
from sharding.sources.insightface import RecError, read_record, record_class, unpack_payload
from ssfer_dist import storage
from ssfer_dist.detect import make_detector
from ssfer_dist.shards.manifest import ShardInfo, class_hist_of
from ssfer_dist.shards.schema import EXT_CLASS, EXT_IMAGE, EXT_META, UNLABELED, encode_cls

__all__ = ["ShardPlan", "WriterConfig", "build_shard", "load_record", "sidecar_url", "check_done", "sha256_file",
           "open_tar_writer", "publish", "tmp_path_for", "merge_sidecars", "read_merged_state", "STATE_FILE"]

log = logging.getLogger(__name__)

STATE_DIR = "_build"
STATE_FILE = ".build-state.json"       # the sidecars of a finished build, merged
TAR_MTIME = 0.0
TAR_USER = "ssfer"


@dataclasses.dataclass(frozen=True)
class WriterConfig:
    """What every shard task needs: output folder, processing options, detector kind, classes."""

    output: str
    process: ProcessOptions
    detector: str = "none"
    num_classes: int = 0


@dataclasses.dataclass
class ShardPlan:
    """One shard to build: its index/name, its records in order, and the plan fingerprint."""

    index: int
    name: str
    records: Any  # List[FaceRecord] or a compact sources.base.RecordSlice
    fingerprint: str = ""


def sha256_file(path: str, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sidecar_url(output: str, shard_name: str) -> str:
    return storage.join(output, STATE_DIR, shard_name + ".json")


_BLOCK = 512
_ZEROS = bytes(_BLOCK)
_RECORD = 20 * _BLOCK
_HDR_MID = b"0000444\0" + b"0000000\0" * 2  # mode, uid, gid
_HDR_MTIME = b"%011o\0" % int(TAR_MTIME)
_HDR_TAIL = (b"0" + b"\0" * 100 + b"ustar\x0000" + TAR_USER.encode().ljust(32, b"\0") * 2 + b"\0" * 16)


_HDR_CONST_SUM = sum(_HDR_MID) + sum(_HDR_MTIME) + sum(b"        ") + sum(_HDR_TAIL)


@functools.lru_cache(maxsize=64)
def _dot_ext(ext: str) -> Tuple[bytes, int]:
    """``.ext`` as bytes and its byte sum (the part of a member name after the key)."""
    b = ("." + ext).encode("utf-8")
    return b, sum(b)


def _header(name: bytes, name_sum: int, size: int, prefix: bytes = b"") -> bytes:
    """The header block for ``name`` (<= 100 bytes; ``prefix`` <= 155) whose byte sum is ``name_sum``."""
    size_field = b"%011o\0" % size
    chksum = _HDR_CONST_SUM + name_sum + sum(size_field) + (sum(prefix) if prefix else 0)
    return b"".join((name.ljust(100, b"\0"), _HDR_MID, size_field, _HDR_MTIME, b"%06o\0 " % chksum, _HDR_TAIL,
                     prefix.ljust(167, b"\0")))


def ustar_header(name: str, size: int) -> bytes:
    """A USTAR header block for a regular file, byte-identical to what ``tarfile`` writes for a
    ``TarInfo`` with mode 0o444, uid/gid 0, owner ``TAR_USER`` and mtime ``TAR_MTIME``."""
    raw = name.encode("utf-8")
    prefix = b""
    if len(raw) > 100:
        cut = raw.rfind(b"/", 0, 156)
        if cut <= 0 or len(raw) - cut - 1 > 100:
            raise ValueError(f"tar member name too long for USTAR: {name[:80]}...")
        prefix, raw = raw[:cut], raw[cut + 1:]
    return _header(raw, sum(raw), size, prefix)


class SampleTarWriter:
    """Writes samples (``{"__key__": key, ext: bytes, ...}``) as WebDataset tar members ``key.ext``.

    The same layout as ``webdataset.TarWriter(encoder=False)`` — USTAR, members of a sample
    consecutive and sorted by extension, mode 0o444 — with a fixed mtime/owner so equal inputs give
    byte-identical tars (also byte-identical to ``tarfile``'s output for the same members). Headers
    are packed directly rather than through ``webdataset``/``tarfile`` objects: ``import webdataset``
    (1.0.x) imports torch, which costs every worker process seconds of start-up, and per-member
    ``TarInfo`` objects dominate the pass-through path. Shards are read back with ``webdataset`` and
    ``tarfile`` in the tests.
    """

    FLUSH_BYTES = 1 << 20

    def __init__(self, fileobj):
        self.f = fileobj
        self.offset = 0
        self.sha256 = hashlib.sha256()  # of everything written, so the tar need not be re-read
        self._parts: List[bytes] = []  # members not yet written: one write + one hash update per MiB
        self._pending = 0

    def _out(self, data: bytes) -> None:
        self.f.write(data)
        self.sha256.update(data)

    def flush(self) -> None:
        if self._parts:
            self._out(b"".join(self._parts))
            self._parts.clear()
            self._pending = 0

    def write(self, sample: Dict[str, Any]) -> int:
        """Write one sample dict (``__key__`` + extension -> bytes/str)."""
        members = []
        for ext in sorted(k for k in sample if not k.startswith("_")):
            data = sample[ext]
            members.append((ext, data.encode("utf-8") if isinstance(data, str) else data))
        return self.write_members(sample["__key__"], members)

    def write_members(self, key: str, members) -> int:
        """Write one sample from ``[(ext, bytes), ...]`` already in extension order."""
        total = 0
        parts = self._parts
        start = self.offset
        kb = key.encode("utf-8")
        ksum = sum(kb)  # shared by the members' header checksums
        for ext, data in members:
            n = len(data)
            dot_ext, ext_sum = _dot_ext(ext)
            if len(kb) + len(dot_ext) <= 100:
                parts.append(_header(kb + dot_ext, ksum + ext_sum, n))
            else:  # split into prefix + name
                parts.append(ustar_header(f"{key}.{ext}", n))
            parts.append(data)
            pad = (-n) % _BLOCK
            if pad:
                parts.append(_ZEROS[:pad])
            self.offset += _BLOCK + n + pad
            total += n
        self._pending += self.offset - start
        if self._pending >= self.FLUSH_BYTES:
            self.flush()
        return total

    def close(self) -> None:
        tail = 2 * _BLOCK
        rem = (self.offset + tail) % _RECORD
        if rem:
            tail += _RECORD - rem
        self._parts.append(bytes(tail))
        self.offset += tail
        self.flush()


def open_tar_writer(fileobj) -> SampleTarWriter:
    """A tar writer for samples with fixed metadata (reproducible tars)."""
    return SampleTarWriter(fileobj)


# ---------------------------------------------------------------------------------------------- loading
class _Handles:
    """Open file handles of one worker (``.rec`` files stay open across records)."""

    def __init__(self):
        self.files: Dict[str, Any] = {}

    def get(self, path: str):
        f = self.files.get(path)
        if f is None:
            f = self.files[path] = open(path, "rb")
        return f

    def close(self):
        for f in self.files.values():
            f.close()
        self.files.clear()


def _read_file(path: str, size_hint: int) -> bytes:
    """Read a whole file with the fewest syscalls (open, one read of the expected size, close)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        want = size_hint + 1 if size_hint > 0 else 1 << 16
        data = os.read(fd, want)
        if len(data) < want:
            return data
        chunks = [data]
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return b"".join(chunks)
            chunks.append(b)
    finally:
        os.close(fd)


def load_record(rec: FaceRecord, handles: Optional[_Handles] = None) -> Tuple[Any, Dict[str, Any]]:
    """The raw image of ``rec`` (bytes or a PIL image) plus metadata learnt while loading
    (insightface records carry their identity label). Raises ``SkipSample``."""
    kind = rec.load[0]
    if kind == "file":
        try:
            return _read_file(rec.load[1], rec.size_hint), {}
        except FileNotFoundError:
            raise SkipSample("missing_image", rec.load[1]) from None
        except OSError as e:
            raise SkipSample("unreadable_file", f"{rec.load[1]}: {e.strerror or e}") from None
    if kind == "rec":
        path, offset = rec.load[1], rec.load[2]
        f = handles.get(path) if handles else open(path, "rb")
        try:
            _flag, label, labels, img = unpack_payload(read_record(f, offset))
        except RecError as e:
            raise SkipSample("corrupt_record", f"{path}@{offset}: {e}") from None
        finally:
            if handles is None:
                f.close()
        ident = record_class(label, labels)
        lab = [float(v) for v in labels] if labels is not None else float(label)
        return img, {"identity": str(int(ident)), "label_orig": lab}
    if kind == "pixels":
        return pixels_to_image(rec.load[1], rec.load[2], rec.load[3]), {}
    raise ValueError(f"unknown record loader {kind!r}")


# ---------------------------------------------------------------------------------------------- writing
_jstr = json.encoder.encode_basestring_ascii  # what json.dumps uses for str with ensure_ascii=True

@functools.lru_cache(maxsize=4096)
def _box_str(box) -> str:
    # keyed on the box as given: equal boxes (0 / 0.0 / -0.0) give the same text, so caching is exact
    return "[" + ", ".join(repr(round(float(v) + 0.0, 3)) for v in box) + "]"


_META_FMT = ('{"box": %s, "box_source": %s, "cls": %d, "identity": %s, "label_orig": %s, "orig_size": [%d, %d], '
             '"source": %s, "source_id": %s}')


def meta_json(*, source, source_id, box, orig_size, box_source, identity, label_orig, cls) -> bytes:
    """The sample's ``json`` member: byte-identical to ``SampleMeta(...).to_json()`` (tested; -0.0 is
    written as 0.0), built by a template instead of ``dataclasses.asdict`` + ``json.dumps`` (a third of
    the pass-through time)."""
    ident = "null" if identity is None else _jstr(identity)
    orig = "null" if label_orig is None else json.dumps(label_orig, sort_keys=True)
    return (_META_FMT % (_box_str(tuple(box)), _jstr(box_source), int(cls), ident, orig, int(orig_size[0]),
                         int(orig_size[1]), _jstr(source), _jstr(source_id))).encode("utf-8")


def publish(local_tmp: str, url: str) -> None:
    """Make the finished temporary tar visible under ``url`` atomically."""
    if storage.is_s3(url):
        storage.put_file(local_tmp, url)
    else:
        os.replace(local_tmp, url)


def tmp_path_for(output: str, name: str) -> str:
    """A fresh temporary file for shard ``name``: in ``output`` (hidden ``.tmp-`` name) for local
    folders, so publishing is a same-filesystem rename; in the system temp folder for S3."""
    if storage.is_s3(output):
        fd, path = tempfile.mkstemp(prefix=f"ssfer-{name}-", suffix=".tar")
    else:
        os.makedirs(output, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f".tmp-{name}-", suffix=".part", dir=output)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path


_DETECTORS: Dict[str, Any] = {}


def _detector(kind: str):
    if kind == "none":
        return None
    if kind not in _DETECTORS:
        _DETECTORS[kind] = make_detector(kind)
    return _DETECTORS[kind]


def build_shard(plan: ShardPlan, cfg: WriterConfig, progress=None) -> Dict[str, Any]:
    """Build, publish and record one whole shard. Returns a JSON-able result: ``shard`` (ShardInfo
    fields), ``skipped`` (list of dicts), ``counts`` (box sources, pass-through)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = cfg.process.max_pixels
    detector = _detector(cfg.detector)
    url = storage.join(cfg.output, plan.name)
    tmp = tmp_path_for(cfg.output, plan.name)
    handles = _Handles()
    keys: List[str] = []
    classes: List[int] = []
    skipped: List[Dict[str, str]] = []
    box_counts: Dict[str, int] = {}
    passed = 0
    pending = 0
    try:
        with open(tmp, "wb", buffering=0) as fobj:  # the writer hands over 1 MiB at a time
            writer = open_tar_writer(fobj)
            for rec in plan.records:
                pending += 1
                if progress is not None and pending >= 64:
                    progress(pending)
                    pending = 0
                try:
                    raw, extra = load_record(rec, handles)
                    src, keep = rec.box_source, rec.aligned
                    if src == "frame" and cfg.detector != "none":    # aligned crop: detector box, frame kept
                        src, keep = "detect", True
                    out = process_image(raw, rec.box, src, cfg.process, detector, keep_frame=keep)
                except SkipSample as e:
                    skipped.append({"reason": e.reason, "item": rec.key, "source": _where(rec), "detail": e.detail})
                    continue
                cls = rec.cls
                js = meta_json(source=rec.source, source_id=rec.source_id, box=out.box, orig_size=out.orig_size,
                               box_source=out.box_source, identity=extra.get("identity", rec.identity),
                               label_orig=extra.get("label_orig", rec.label_orig), cls=cls)
                if cls != UNLABELED:  # members in extension order: cls, jpg, json
                    writer.write_members(rec.key, ((EXT_CLASS, encode_cls(cls)), (EXT_IMAGE, out.jpeg),
                                                   (EXT_META, js)))
                else:
                    writer.write_members(rec.key, ((EXT_IMAGE, out.jpeg), (EXT_META, js)))
                keys.append(rec.key)
                classes.append(cls)
                box_counts[out.box_source] = box_counts.get(out.box_source, 0) + 1
                passed += out.passed_through
            writer.close()
        if progress is not None and pending:
            progress(pending)
        counts = {"box_" + k: v for k, v in box_counts.items()}
        if passed:
            counts["passed_through"] = passed
        if len(keys) - passed:
            counts["reencoded"] = len(keys) - passed
        info = ShardInfo(name=plan.name, url=url, num_samples=len(keys), num_bytes=writer.offset,
                         sha256=writer.sha256.hexdigest(), class_hist=class_hist_of(classes, cfg.num_classes),
                         keys=keys, classes=classes)
        publish(tmp, url)
    finally:
        handles.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    result = {"shard": _info_dict(info), "skipped": skipped, "counts": counts, "fingerprint": plan.fingerprint}
    # not fsynced: a sidecar lost in a crash only means its shard is rebuilt (check_done re-checks it)
    storage.put_bytes(sidecar_url(cfg.output, plan.name), json.dumps(result, sort_keys=True).encode(), durable=False)
    return result


def _where(rec: FaceRecord) -> str:
    if rec.load[0] == "file":
        return rec.load[1]
    if rec.load[0] == "rec":
        return f"{rec.load[1]}@{rec.load[2]}"
    return rec.source_id


def _info_dict(info: ShardInfo) -> Dict[str, Any]:
    return {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}


def info_from_dict(d: Dict[str, Any], output: str) -> ShardInfo:
    d = dict(d)
    d["url"] = storage.join(output, d["name"])
    return ShardInfo(**d)


def _remote_size(url: str) -> Optional[int]:
    if storage.is_s3(url):
        from botocore.exceptions import ClientError

        bucket, key = storage.parse_s3(url)
        try:
            return int(storage.s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError:
            return None
    try:
        return os.path.getsize(url)
    except OSError:
        return None


def merge_sidecars(output: str, results: List[Dict[str, Any]]) -> None:
    """After the manifest: every shard's result into ``STATE_FILE``, then ``_build/`` removed."""
    state = {"results": {r["shard"]["name"]: r for r in results}}
    storage.put_bytes(storage.join(output, STATE_FILE), json.dumps(state, sort_keys=True).encode())
    if storage.is_s3(output):
        for name in storage.list_files(storage.join(output, STATE_DIR)):
            storage.delete(storage.join(output, STATE_DIR, name))
    else:
        storage.delete(storage.join(output, STATE_DIR))


def read_merged_state(output: str) -> Dict[str, Dict[str, Any]]:
    """The shard results merged by :func:`merge_sidecars` (empty when none or unreadable)."""
    url = storage.join(output, STATE_FILE)
    try:
        if not storage.exists(url):
            return {}
        return dict(json.loads(storage.get_bytes(url)).get("results", {}))
    except (ValueError, AttributeError, storage.StorageError):
        return {}


def check_done(plan: ShardPlan, cfg: WriterConfig, recorded: Optional[Dict[str, Any]] = None
               ) -> Optional[Dict[str, Any]]:
    """The recorded result of ``plan`` when its shard is already complete (sidecar — or ``recorded``,
    from the merged state — fingerprint, name, size and, for local shards, sha256 all match), else ``None``."""
    side = sidecar_url(cfg.output, plan.name)
    try:
        if recorded is not None:
            res = recorded
        elif not storage.exists(side):
            return None
        else:
            res = json.loads(storage.get_bytes(side))
    except (ValueError, storage.StorageError):
        return None
    shard = res.get("shard", {})
    if res.get("fingerprint") != plan.fingerprint or shard.get("name") != plan.name:
        return None
    url = storage.join(cfg.output, plan.name)
    if _remote_size(url) != shard.get("num_bytes"):
        return None
    if not storage.is_s3(url) and sha256_file(url) != shard.get("sha256"):
        return None
    return res
