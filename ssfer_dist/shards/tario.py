"""Tar shard → samples: the one reader of the tools that read shards without the training pipeline
(``ssfer evaluate``, ``ssfer-shard verify | inspect | split``).

A sample is the run of consecutive tar members that share a key; a member's key and extension split at
the first dot of its basename (``"a/b.c.d" -> ("a/b", "c.d")``), as WebDataset splits them, so these tools
and the training pipeline (``webdataset.tarfile_to_samples`` in ``data/pipeline.py``) see the same samples
(``tests/test_pipeline.py`` checks that). Standard library only: importing webdataset imports torch, which
the shard tools do not need.

Shards are untrusted input. A member is *refused* (never loaded, never yielded, reported as a
:class:`MemberProblem`) when its name is absolute or has a ``..`` component, when it is not a regular file
(link, hard link, folder, device, fifo), or when it is larger than the per-member cap
(``max_member_bytes``, default :data:`DEFAULT_MAX_MEMBER_BYTES`; a stored face image is a few kB). A
sample with a refused member is dropped whole. The tar is read as a stream: memory stays at one member
under the cap, whatever the shard holds.
"""
from __future__ import annotations

import dataclasses
import tarfile
from typing import IO, Callable, Dict, Iterator, List, Optional, Tuple
from ssfer_dist import storage

__all__ = ["split_member_name", "iter_tar_samples", "iter_url_samples", "iter_tar_members", "MemberProblem",
           "member_problem", "DEFAULT_MAX_MEMBER_BYTES"]

DEFAULT_MAX_MEMBER_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class MemberProblem:
    """A refused tar member: ``reason`` is ``unsafe_name`` | ``not_a_file`` | ``too_large``."""

    member: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"member {self.member!r}: {self.detail}"


def split_member_name(name: str) -> Tuple[str, str]:
    """``"a/b.c.d" -> ("a/b", "c.d")`` — WebDataset's key/extension split (first dot of the basename)."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


def member_problem(m: tarfile.TarInfo, max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES
                   ) -> Optional[MemberProblem]:
    """Why the member ``m`` must not be read, or ``None`` when it may."""
    name = m.name
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
        return MemberProblem(name, "unsafe_name", "absolute path or '..' in the member name")
    if not m.isreg():
        kind = ("symlink" if m.issym() else "hard link" if m.islnk() else "folder" if m.isdir()
                else "device" if m.isdev() else "special member")
        target = f" -> {m.linkname}" if (m.issym() or m.islnk()) else ""
        return MemberProblem(name, "not_a_file", f"{kind}{target}, not a regular file")
    if max_member_bytes is not None and m.size > max_member_bytes:
        return MemberProblem(name, "too_large", f"{m.size} bytes, over the {max_member_bytes}-byte member cap")
    return None


def iter_tar_members(fileobj: IO[bytes], max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
                     on_problem: Optional[Callable[[MemberProblem], None]] = None,
                     ) -> Iterator[Tuple[str, Optional[bytes]]]:
    """``(name, bytes)`` per member of a tar stream, front to back; a refused member is reported to
    ``on_problem`` and yields ``(name, None)`` without its data being read."""
    with tarfile.open(fileobj=fileobj, mode="r|") as tf:
        for m in tf:
            prob = member_problem(m, max_member_bytes)
            if prob is not None:
                if on_problem is not None:
                    on_problem(prob)
                yield m.name, None
                continue
            f = tf.extractfile(m)
            yield m.name, f.read()
            tf.members = []      # a stream of millions of members keeps no TarInfo list


def iter_tar_samples(fileobj: IO[bytes], max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
                     problems: Optional[List[MemberProblem]] = None) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` from a tar stream (read once, front to back), grouping consecutive
    members by key. Refused members (see the module doc) are appended to ``problems``; their samples are
    not yielded."""
    key: Optional[str] = None
    sample: Dict[str, bytes] = {}
    bad = False
    for name, data in iter_tar_members(fileobj, max_member_bytes, problems.append if problems is not None else None):
        k, ext = split_member_name(name)
        if k != key and key is not None:
            if not bad:
                yield key, sample
            sample, bad = {}, False
        key = k
        if data is None:
            bad = True
        else:
            sample[ext] = data
    if key is not None and not bad:
        yield key, sample


def iter_url_samples(url: str, max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
                     problems: Optional[List[MemberProblem]] = None) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """:func:`iter_tar_samples` of one shard by URL (a local path or ``s3://``); closes the stream."""

    stream = storage.open_read(url)
    try:
        yield from iter_tar_samples(stream, max_member_bytes, problems)
    finally:
        stream.close()
