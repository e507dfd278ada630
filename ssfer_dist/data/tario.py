"""Tar shard → samples: the one reader of the tools that read shards without the training pipeline
(``ssfer evaluate``, ``ssfer-shard verify | inspect | split``).

A sample is the run of consecutive tar members that share a key; a member's key and extension split at
the first dot of its basename (``"a/b.c.d" -> ("a/b", "c.d")``), as WebDataset splits them, so these tools
and the training pipeline (``webdataset.tarfile_to_samples`` in ``data/pipeline.py``) see the same samples
(``tests/test_pipeline.py`` checks that). Standard library only: importing webdataset imports torch, which
the shard tools do not need.
"""
from __future__ import annotations

import tarfile
from typing import IO, Dict, Iterator, Optional, Tuple

__all__ = ["split_member_name", "iter_tar_samples", "iter_url_samples"]


def split_member_name(name: str) -> Tuple[str, str]:
    """``"a/b.c.d" -> ("a/b", "c.d")`` — WebDataset's key/extension split (first dot of the basename)."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


def iter_tar_samples(fileobj: IO[bytes]) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` from a tar stream (read once, front to back), grouping consecutive
    members by key. Members that are not regular files are skipped."""
    key: Optional[str] = None
    sample: Dict[str, bytes] = {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tf:
        for m in tf:
            if not m.isfile():
                continue
            k, ext = split_member_name(m.name)
            data = tf.extractfile(m).read()
            if k != key and key is not None:
                yield key, sample
                sample = {}
            key = k
            sample[ext] = data
    if key is not None:
        yield key, sample


def iter_url_samples(url: str) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """:func:`iter_tar_samples` of one shard by URL (a local path or ``s3://``); closes the stream."""
    from ssfer_dist import storage

    stream = storage.open_read(url)
    try:
        yield from iter_tar_samples(stream)
    finally:
        stream.close()
