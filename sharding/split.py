"""``ssfer-shard split``: a labeled subset and the unlabeled remainder of a shard folder, for the
semi-supervised stage. Writes ``OUT/labeled/`` and ``OUT/unlabeled/``, each a complete shard folder
with its own manifest (``role`` labeled / unlabeled). Samples are copied byte-for-byte (the unlabeled
remainder keeps its ``cls`` members, so pseudo-label accuracy can be measured; training ignores them).

Selection: with ``per_class`` every class ``c`` contributes ``max(1, round(fraction * n_c))`` samples,
otherwise ``max(1, round(fraction * N))`` overall; keys are sorted then shuffled with
``random.Random(seed)``, so the same seed gives the same split.
"""
from __future__ import annotations

import logging
import os
import random
from typing import Any, Dict, List, Set

from sharding.writer import open_tar_writer, publish, tmp_path_for
from ssfer_dist import storage
from ssfer_dist.shards.manifest import ShardInfo, class_hist_of, read_manifest, write_manifest
from ssfer_dist.shards.schema import EXT_CLASS, decode_cls
from ssfer_dist.shards.tario import DEFAULT_MAX_MEMBER_BYTES, MemberProblem, iter_tar_samples
from ssfer_dist.errors import UserError

__all__ = ["split_shards", "choose_labeled"]

log = logging.getLogger(__name__)


def choose_labeled(keys: List[str], classes: List[int], fraction: float, per_class: bool, seed: int) -> Set[str]:
    """The keys of the labeled subset (deterministic for a seed)."""
    rng = random.Random(seed)
    chosen: Set[str] = set()
    if per_class:
        by_class: Dict[int, List[str]] = {}
        for k, c in zip(keys, classes):
            by_class.setdefault(c, []).append(k)
        for c in sorted(by_class):
            ks = sorted(by_class[c])
            rng.shuffle(ks)
            chosen.update(ks[: max(1, round(fraction * len(ks)))])
    else:
        ks = sorted(keys)
        rng.shuffle(ks)
        chosen.update(ks[: max(1, round(fraction * len(ks)))])
    return chosen


class _RollingWriter:
    """Writes samples into ``<folder>/<name>-%06d.tar`` shards of ``per_shard`` samples (atomic publish)."""

    def __init__(self, folder: str, name: str, per_shard: int, num_classes: int):
        self.folder, self.name, self.per_shard, self.num_classes = folder, name, per_shard, num_classes
        self.shards: List[ShardInfo] = []
        self._w = None
        self._open_new = True

    def _start(self):
        self._tmp = tmp_path_for(self.folder, f"{self.name}-{len(self.shards):06d}.tar")
        self._f = open(self._tmp, "wb")
        self._w = open_tar_writer(self._f)
        self._keys: List[str] = []
        self._classes: List[int] = []

    def write(self, key: str, sample: Dict[str, bytes]) -> None:
        if self._w is None:
            self._start()
        self._w.write(dict(sample, __key__=key))
        self._keys.append(key)
        self._classes.append(decode_cls(sample[EXT_CLASS]) if EXT_CLASS in sample else -1)
        if len(self._keys) >= self.per_shard:
            self.finish()

    def abort(self) -> None:
        """Drop the shard being written (its temp file); published shards stay."""
        if self._w is None:
            return
        self._f.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)
        self._w = None

    def finish(self) -> None:
        if self._w is None:
            return
        self._w.close()
        self._f.close()
        name = f"{self.name}-{len(self.shards):06d}.tar"
        url = storage.join(self.folder, name)
        try:
            info = ShardInfo(name=name, url=url, num_samples=len(self._keys), num_bytes=self._w.offset,
                             sha256=self._w.sha256.hexdigest(),
                             class_hist=class_hist_of(self._classes, self.num_classes),
                             keys=self._keys, classes=self._classes)
            publish(self._tmp, url)
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
        self.shards.append(info)
        self._w = None


def split_shards(src: str, out: str, *, fraction: float, per_class: bool, seed: int,
                 samples_per_shard: int = 1000, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Dict[str, Any]:
    """Split the shard folder ``src`` into ``out/labeled`` and ``out/unlabeled``; returns the counts.
    Refused members (unsafe names, links, members over ``max_member_bytes``) are never copied: their samples
    are skipped, and the split ends with a ``UserError`` before any manifest is written."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--fraction {fraction}: must be between 0 and 1 (exclusive)")
    if samples_per_shard < 1:
        raise UserError(f"--samples-per-shard {samples_per_shard}: must be at least 1")
    m = read_manifest(src)
    if per_class and m.num_classes == 0:
        raise UserError(f"{m.url}: --per-class needs a labeled shard set (this one has no classes)")
    idx = m.index()
    keys = idx.column("key").to_pylist()
    classes = idx.column("cls").to_pylist()
    labeled = choose_labeled(keys, classes, fraction, per_class, seed)
    storage.check_writable(out)
    folders = {"labeled": storage.join(out, "labeled"), "unlabeled": storage.join(out, "unlabeled")}
    writers = {r: _RollingWriter(f, m.dataset or "shard", samples_per_shard, m.num_classes) for r, f in folders.items()}
    refused: List[MemberProblem] = []
    bad_shard = ""
    for sh in m.shards:
        with storage.open_read(sh.url) as f:
            for key, sample in iter_tar_samples(f, max_member_bytes, refused):
                writers["labeled" if key in labeled else "unlabeled"].write(key, sample)
        if refused and not bad_shard:
            bad_shard = sh.url
    if refused:
        for w in writers.values():
            w.abort()
        raise UserError(f"{bad_shard}: {len(refused)} refused tar member(s), first {refused[0]}; their samples "
                        f"were not copied and no manifest was written (run `ssfer-shard verify {m.url}`)")
    counts: Dict[str, Any] = {}
    for role, w in writers.items():
        w.finish()
        write_manifest(folders[role], w.shards, dataset=m.dataset, image_size=m.image_size,
                       num_classes=m.num_classes, role=role,
                       extra={"split_of": m.url, "fraction": fraction, "per_class": per_class, "seed": seed})
        counts[role] = sum(s.num_samples for s in w.shards)
    if counts["labeled"] + counts["unlabeled"] != m.num_samples:
        raise UserError(f"{m.url}: read {counts['labeled'] + counts['unlabeled']} samples but the manifest "
                        f"names {m.num_samples}; run `ssfer-shard verify {m.url}`")
    return counts
