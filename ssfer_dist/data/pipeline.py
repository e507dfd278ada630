"""WebDataset training pipelines: resampled shards → split by node and worker → shuffle → decode → aug → batch.

Each rank reads its own stream; loader worker processes are *lanes*. Global micro-batch ``k`` of a
rank is produced by lane ``k % num_lanes`` from a stream seeded by ``(seed, rank, lane, epoch)``
with ``epoch = k // batches_per_epoch``, so

- every rank takes exactly ``batches_per_epoch`` batches per epoch (derived from the manifest) and
  none ever runs out first (resampled shards: the stream is infinite);
- the batch sequence is a pure function of the position, so a resumed run restarts at micro-batch
  ``k`` and sees the same batches the uninterrupted run would have seen (the skipped samples are
  read from the tar but not decoded).

Corrupt samples (bad JPEG, bad JSON, truncated tar) are skipped by a handler and counted; every batch
carries its lane's running count in ``"__corrupt__"`` so the loop can report it.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import random
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssfer_dist.data.order import SlotOrder, mixture_counts, seed_of, slot_of
from ssfer_dist.data.transforms import build_transform
from ssfer_dist.errors import UserError
from ssfer_dist.shards.safeimage import DEFAULT_MAX_PIXELS, ImageTooLarge, jpeg_header, open_image
from ssfer_dist.shards.schema import EXT_CLASS, EXT_IMAGE, EXT_META
from ssfer_dist.shards.tario import DEFAULT_MAX_MEMBER_BYTES, iter_tar_members, split_member_name

log = logging.getLogger(__name__)

__all__ = ["Source", "View", "StreamSpec", "ShardStream", "make_loader", "stream_seed", "split_urls",
           "decode_image", "RawDecode", "draft_decoded_size"]


@dataclasses.dataclass(frozen=True)
class Source:
    """Shard URLs of one dataset and its mixing weight (unlabeled mixtures). ``offsets`` (one per URL,
    optional): the sample id of each shard's first sample; with them every sample carries a stable
    id ``offset + its position in the shard`` (= its row in the manifests' per-sample index, counted
    over all sources), which FlexMatch keys its per-sample state by."""

    urls: Tuple[str, ...]
    weight: float = 1.0
    offsets: Tuple[int, ...] = ()
    counts: Tuple[int, ...] = ()      # samples per shard (the manifest's): needed by data.order "shards"


@dataclasses.dataclass(frozen=True)
class View:
    """One augmented view of a sample: ``name`` in the batch, transform ``kind``
    (``data.transforms.build_transform``). ``on_device``: the CPU only decodes (uint8 at the stored size,
    or the JPEG bytes with ``decode="device"``) and ``data.device_aug.DeviceAugment`` makes the view on
    the training device."""

    name: str
    kind: str
    on_device: bool = False


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """A batched stream: sources, views, batch size, labels wanted or not."""

    sources: Tuple[Source, ...]
    views: Tuple[View, ...]
    batch_size: int
    labeled: bool
    prefix: str = ""                  # key prefix in the batch ("" labeled, "u_" unlabeled)
    raw_size: int = 0                 # stored image size (on-device views; 0: the lane's first image sets it)


def stream_seed(seed: int, rank: int, lane: int, epoch: int, tag: str = "") -> int:
    """A stable 63-bit seed for one (rank, lane, epoch) stream."""
    return seed_of(seed, rank, lane, epoch, tag)


def split_urls(urls: Sequence[str], rank: int, world_size: int, lane: int, num_lanes: int) -> List[str]:
    """Split shards by node (rank) and then by worker (lane) when there are enough of them.

    With fewer shards than ranks × lanes the split falls back to per-rank, then to all shards
    (resampling with distinct seeds still gives each lane a different order).
    """
    urls = list(urls)
    n = world_size * num_lanes
    if len(urls) >= n:
        return urls[rank * num_lanes + lane::n]
    if len(urls) >= world_size:
        return urls[rank::world_size]
    return urls


class _Counter:
    """Exception handler that counts and continues (corrupt samples are not fatal)."""

    MAX_IN_A_ROW = 10000

    def __init__(self) -> None:
        self.count = 0
        self.in_a_row = 0
        self.resized = 0         # decode-only views: images not at the stream's size, resized on the CPU

    def ok(self) -> None:
        self.in_a_row = 0

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, (FileNotFoundError, PermissionError, UserError)):
            raise exn            # a missing/unreadable shard is not a corrupt sample: fail loudly
        self.count += 1
        self.in_a_row += 1
        if self.in_a_row > self.MAX_IN_A_ROW:
            raise RuntimeError(f"{self.in_a_row} corrupt samples in a row, none decodable: {exn}")
        if self.count <= 5:
            log.warning("skipping corrupt sample: %s", str(exn).splitlines()[0] if str(exn) else type(exn).__name__)
        return True


def guarded_tarfile_to_samples(handler, max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES):
    """``webdataset.tarfile_to_samples`` with every member checked first (``shards/tario.py``): a member with an
    absolute or ``..`` name, a link / non-regular member, or one over ``max_member_bytes`` is never read;
    it is reported to ``handler`` (counted corrupt) and its whole sample dropped (webdataset's ``__bad__``
    marker). webdataset's URL opener and key grouping are kept, so the samples are the same otherwise."""
    from webdataset.tariterators import group_by_keys, url_opener

    def members(sources):
        for source in sources:
            url = source["url"]
            try:
                for name, data in iter_tar_members(source["stream"], max_member_bytes,
                                                   lambda p, url=url: handler(CorruptMember(f"{url}: {p}"))):
                    if data is None:
                        yield {"fname": split_member_name(name)[0] + ".__bad__", "data": True, "__url__": url}
                    else:
                        yield {"fname": name, "data": data, "__url__": url}
                yield {}     # end of shard: samples never span shards
            except Exception as exn:  # noqa: BLE001 - a torn tar is a corrupt shard, counted like webdataset does
                exn.args = exn.args + (url,)
                if not handler(exn):
                    break

    def expand(src):
        return group_by_keys(members(url_opener(src, handler=handler)), handler=handler)

    return expand


class CorruptMember(ValueError):
    """A refused tar member (see :func:`guarded_tarfile_to_samples`)."""


def decode_image(data: bytes, draft_size: Optional[int] = None):
    """JPEG bytes → (PIL RGB image, scale). With ``draft_size`` the JPEG decoder may downscale by 2/4/8
    on the fly (PIL ``Image.draft``) while the result stays ≥ ``draft_size``; ``scale`` is the factor
    applied to the stored image's pixel frame (1.0 without draft)."""
    img = open_image(data)      # refuses a header claiming a huge frame before any pixel is decoded
    w0 = img.size[0]
    if draft_size:
        img.draft("RGB", (draft_size, draft_size))
    if img.mode == "RGB":
        img.load()               # (convert("RGB") would decode and then copy)
    else:
        img = img.convert("RGB")
    return img, img.size[0] / float(w0)


def jpeg_frame_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from a JPEG's SOF marker (no decode), None when not found."""
    header = jpeg_header(data)
    return None if header is None else header[:2]


def decode_hwc(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """JPEG bytes → uint8 H x W x 3 with ``torchvision.io.decode_jpeg`` (libjpeg-turbo, no Python header
    parse: ~1.5x PIL per small face here, same pixels). The SOF header's pixel count is capped first like
    ``safeimage.open_image`` (a header without one goes through PIL). Raises on a corrupt JPEG like PIL."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    size = jpeg_frame_size(data)
    if size is None:
        return np.asarray(decode_image(data)[0], dtype=np.uint8)
    if size[0] * size[1] > max_pixels:
        raise ImageTooLarge(f"JPEG header claims {size[0]}x{size[1]} pixels, over the {max_pixels}-pixel cap")

    with warnings.catch_warnings():   # torchvision >= 0.29 warns on every call (TorchCodec supersedes it)
        warnings.simplefilter("ignore", DeprecationWarning)
        t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return t.permute(1, 2, 0).contiguous().numpy()


def draft_decoded_size(size: int, draft_size: Optional[int]) -> int:
    """The side of a ``size`` x ``size`` JPEG decoded with ``Image.draft`` towards ``draft_size`` (PIL's
    DCT scaling: 1/1, 1/2, 1/4 or 1/8, the result still >= ``draft_size``; sides round up)."""
    if not draft_size:
        return size
    a = max((f for f in (8, 4, 2, 1) if size // draft_size >= f), default=1)
    return (size + a - 1) // a


class RawDecode:
    """Decode-only for on-device views: ``(sample, PIL image, box) -> (uint8 [R, R, 3] or JPEG bytes, box)``
    (batched: uint8 ``[N, R, R, 3]`` as decoded, channels last; ``DeviceAugment`` takes it so).

    ``R`` is the stream's stored size (after draft) or, with ``raw_size`` 0, the first image's. An image of
    another size (a shard that breaks the fixed-size contract) is resized to R on the CPU, its box with it,
    and counted in ``counter.resized`` (the batch's ``__resized__``); collation never sees mixed sizes. With
    ``ship_bytes`` the JPEG goes as is (its size read from the header; a stray is decoded, resized and
    re-encoded here, so the device decodes one size).
    """

    def __init__(self, raw_size: int, draft_size: Optional[int], counter: "_Counter") -> None:
        self.size: Optional[Tuple[int, int]] = None
        if raw_size:
            r = draft_decoded_size(int(raw_size), draft_size)
            self.size = (r, r)
        self.counter = counter

    def __call__(self, sample: Dict[str, Any], img, box: Optional[np.ndarray], ship_bytes: bool):
        from PIL import Image

        data = sample[EXT_IMAGE]
        if ship_bytes:             # the size from the JPEG header (no decode; pixel cap checked)
            img = open_image(data)
        if isinstance(img, np.ndarray):          # decoded by decode_hwc
            (h, w), arr = img.shape[:2], img
            if self.size is None or (w, h) == self.size:
                b = np.array([0, 0, w, h] if box is None else box, dtype=np.float32)
                self.size = self.size or (w, h)
                return arr, b
            img = Image.fromarray(arr)
        w, h = img.size
        b = np.array([0, 0, w, h] if box is None else box, dtype=np.float32)
        if self.size is None:
            self.size = (w, h)
        if (w, h) != self.size:
            self.counter.resized += 1
            if self.counter.resized <= 5:
                log.warning("%s: image %s is %dx%d, the stream's are %dx%d: resized on the CPU",
                            sample.get("__url__", "?"), sample.get("__key__", "?"), w, h, *self.size)
            img = img.convert("RGB").resize(self.size, Image.BICUBIC)
            b *= np.array([self.size[0] / w, self.size[1] / h] * 2, dtype=np.float32)
            if ship_bytes:
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=95)
                return buf.getvalue(), b
        if ship_bytes:
            return data, b
        return np.asarray(img, dtype=np.uint8), b       # H x W x 3, as decoded


def _resampled(urls: List[str], rng: random.Random) -> Iterator[Dict[str, str]]:
    while True:
        yield {"url": urls[rng.randrange(len(urls))]}


def _indexed_samples(shards: Iterator[Dict[str, str]], offsets: Dict[str, int], handler,
                     max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[Dict[str, Any]]:
    """``tarfile_to_samples`` one shard at a time, each sample tagged ``__sid__`` = the shard's offset +
    its position in the tar (a corrupt member that loses a whole sample shifts the rest of that shard
    by one: the ids stay in range and stable)."""
    expand = guarded_tarfile_to_samples(handler, max_member_bytes)
    for src in shards:
        base = offsets[src["url"]]
        for i, sample in enumerate(expand(iter([src]))):
            sample["__sid__"] = base + i
            yield sample


def _mixed(iters: List[Iterator[Dict[str, Any]]], weights: List[float], rng: random.Random):
    if len(iters) == 1:
        yield from iters[0]
        return
    while True:
        i = rng.choices(range(len(iters)), weights=weights)[0]
        yield next(iters[i])


def _skip(it: Iterator[Any], n: int) -> Iterator[Any]:
    for _ in range(n):
        next(it)
    yield from it


class ShardStream(IterableDataset):
    """Batches for one rank, as a flat list of webdataset stages per (lane, epoch).

    ``specs``: one StreamSpec (MAE / FaceMix) or two (semi-supervised: labeled + unlabeled, zipped
    per batch). ``start_batch``: the rank's first micro-batch index (resume).
    """

    def __init__(self, specs: Sequence[StreamSpec], *, img_size: int, rank: int, world_size: int,
                 batches_per_epoch: int, seed: int, shuffle_buffer: int = 1000, uint8: bool = True,
                 draft: bool = False, start_batch: int = 0, num_lanes: int = 1,
                 transform_factory: Optional[Callable[[str, int, bool], Callable]] = None,
                 decode: str = "cpu",
                 max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
                 order: str = "resampled", virtual_slots: int = 0) -> None:
        super().__init__()
        self.specs = tuple(specs)
        self.img_size = img_size
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = int(batches_per_epoch)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.uint8 = uint8
        self.draft = draft
        self.start_batch = int(start_batch)
        self.num_lanes = max(1, int(num_lanes))
        self.transform_factory = transform_factory
        if decode not in ("cpu", "device"):
            raise ValueError(f"decode must be 'cpu' or 'device', got {decode!r}")
        self.decode = decode
        self.max_member_bytes = max_member_bytes
        if order not in ("resampled", "shards"):
            raise ValueError(f"order must be 'resampled' or 'shards', got {order!r}")
        if order == "shards":
            for spec in self.specs:
                for src in spec.sources:
                    if len(src.counts) != len(src.urls):
                        raise ValueError(f"order 'shards' needs each shard's sample count: {len(src.urls)} URLs, "
                                         f"{len(src.counts)} counts")
        self.order = order
        self.virtual_slots = int(virtual_slots) or self.world_size * self.num_lanes

    # ------------------------------------------------------------------ per-sample work

    def _transforms(self) -> Dict[str, Callable]:
        factory = self.transform_factory
        if factory is None:
            factory = build_transform
        kinds = {v.kind for s in self.specs for v in s.views if not v.on_device}
        return {k: factory(k, self.img_size, self.uint8) for k in kinds}

    def _decode_fn(self, spec: StreamSpec, tfs: Dict[str, Callable], counter: "_Counter"):
        draft = self.img_size if self.draft else None
        ship_bytes = self.decode == "device"
        on_device = any(v.on_device for v in spec.views)
        cpu_views = any(not v.on_device for v in spec.views)
        # decode-only views, nothing for PIL to do (no CPU view, draft cannot shrink the stored size):
        # libjpeg-turbo through torchvision, bit-identical to PIL's decode without its Python header parse
        fast = (on_device and not ship_bytes and not cpu_views
                and (not draft or (spec.raw_size and spec.raw_size < 2 * draft)))
        need_pil = cpu_views or (on_device and not ship_bytes and not fast)
        raw = RawDecode(spec.raw_size, draft if not ship_bytes else None, counter)

        def decode(sample: Dict[str, Any]) -> Dict[str, Any]:
            img, scale = decode_image(sample[EXT_IMAGE], draft) if need_pil else (None, 1.0)
            if fast:
                img = decode_hwc(sample[EXT_IMAGE])
            box = None
            if EXT_META in sample:
                box = np.asarray(json.loads(sample[EXT_META])["box"], dtype=np.float32) * scale
            out: Dict[str, Any] = {}
            if on_device:       # decode only: uint8 at the stream's stored size (or the JPEG bytes) + raw box
                raw_img, raw_box = raw(sample, img, box, ship_bytes)
            for v in spec.views:
                if v.on_device:
                    out[spec.prefix + v.name] = raw_img
                    if v.name == "image":
                        out["box"] = raw_box
                    continue
                x, b = tfs[v.kind](img, box)
                out[spec.prefix + v.name] = x
                if v.name == "image":
                    out["box"] = np.asarray(b, dtype=np.float32)
            if spec.labeled:
                out["label"] = int(sample[EXT_CLASS].decode("ascii").strip())
            elif spec.prefix:   # unlabeled stream: true label when the shard has one (pseudo-label accuracy)
                cls = sample.get(EXT_CLASS)
                out[spec.prefix + "label"] = int(cls.decode("ascii").strip()) if cls else -1
            if "__sid__" in sample:
                out[spec.prefix + "index"] = sample["__sid__"]
            counter.ok()
            return out

        return decode

    def _lane_stream(self, spec: StreamSpec, lane: int, epoch: int, skip: int, tfs, counter: _Counter):
        rng = random.Random(stream_seed(self.seed, self.rank, lane, epoch, spec.prefix))
        per_source = []
        for si, src in enumerate(spec.sources):
            urls = split_urls(src.urls, self.rank, self.world_size, lane, self.num_lanes)
            srng = random.Random(rng.getrandbits(63) + si)
            if src.offsets:  # tar members → samples, each with its stable id
                expand = partial(_indexed_samples, offsets=dict(zip(src.urls, src.offsets)), handler=counter,
                                 max_member_bytes=self.max_member_bytes)
            else:            # tar members → samples
                expand = guarded_tarfile_to_samples(counter, self.max_member_bytes)
            per_source.append(wds.DataPipeline(
                lambda urls=urls, srng=srng: _resampled(urls, srng),   # resampled shards (this rank+lane's split)
                expand,
            ))
        mixed = _mixed([iter(p) for p in per_source], [s.weight for s in spec.sources], rng)
        pipe = wds.DataPipeline(
            lambda: mixed,
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng),
            lambda it: _skip(it, skip * spec.batch_size),             # resume: skip undecoded samples
            wds.map(self._decode_fn(spec, tfs, counter), handler=counter),     # decode + the stage's transforms
            lambda it: _batches(it, spec.batch_size),                  # batch per rank (no look-ahead)
        )
        return iter(pipe)

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.num_lanes:
            raise RuntimeError(f"ShardStream built for {self.num_lanes} lanes but run with {num_workers} workers")
        torch.set_num_threads(1)
        if self.order == "shards":
            yield from self._iter_ordered(worker)
            return
        tfs = self._transforms()
        counter = _Counter()
        bpe = self.batches_per_epoch
        L = self.num_lanes
        # The DataLoader takes batches round-robin from workers starting at worker 0, so worker w
        # produces global batches start+w, start+w+L, ...; their lane is k % L.
        k = self.start_batch + worker
        lane = k % L
        epoch = None
        iters = None
        while True:
            e = k // bpe
            if e != epoch:
                epoch = e
                first = e * bpe
                # lane batches of this epoch before k (skipped without decoding)
                done = len(range(first + ((lane - first) % L), k, L))
                iters = [self._lane_stream(s, lane, e, done, tfs, counter) for s in self.specs]
            # augmentation randomness is a function of the batch index too (same batches after a resume)
            self._seed_batch(k)
            batch: Dict[str, Any] = {}
            for it in iters:
                batch.update(next(it))
            batch["__corrupt__"] = torch.tensor([worker, counter.count], dtype=torch.long)
            batch["__resized__"] = torch.tensor([worker, counter.resized], dtype=torch.long)
            batch["__index__"] = torch.tensor(k, dtype=torch.long)
            yield batch
            k += L


    # ------------------------------------------------------------------ data.order: shards

    def _seed_batch(self, k: int, rank_free: bool = False) -> None:
        """Augmentation randomness of batch ``k``: of (seed, rank, k), or with ``rank_free`` of (seed, k) —
        ``k`` then the global micro-batch index, so the draws do not depend on the rank split."""
        aug_seed = stream_seed(self.seed, -1 if rank_free else self.rank, -1, k, "aug")
        random.seed(aug_seed)
        np.random.seed(aug_seed % (2 ** 32))
        torch.manual_seed(aug_seed)

    def _shard(self, cache: Dict[Any, Any], key, url: str, counter: "_Counter") -> List[Dict[str, Any]]:
        """The samples of shard ``url`` in tar order, read whole (the one read a resumed lane makes per slot);
        ``cache[key]`` keeps the current shard of one (stream, source, slot)."""
        got = cache.get(key)
        if got is not None and got[0] == url:
            return got[1]
        samples = list(guarded_tarfile_to_samples(counter, self.max_member_bytes)(iter([{"url": url}])))
        cache[key] = (url, samples)
        return samples

    def _iter_ordered(self, worker: int) -> Iterator[Dict[str, Any]]:
        """Batches in the shard-level order of :mod:`ssfer_dist.data.order`: this rank's micro-batch ``k`` is
        global micro-batch ``k·R + r``; lane ``worker`` makes ``k = start + worker, start + worker + L, …``."""

        tfs = self._transforms()
        counter = _Counter()
        V, R, L = self.virtual_slots, self.world_size, self.num_lanes
        streams = []
        for spec in self.specs:
            orders = [SlotOrder(src.urls, src.counts, V, self.seed, f"{spec.prefix}{i}")
                      for i, src in enumerate(spec.sources)]
            streams.append((spec, orders, mixture_counts(spec.batch_size, [s.weight for s in spec.sources]),
                            self._decode_fn(spec, tfs, counter)))
        cache: Dict[Any, Any] = {}
        last_good: Dict[int, List[Dict[str, Any]]] = {}
        k = self.start_batch + worker
        while True:
            m = k * R + self.rank
            slot, j = slot_of(m, V)
            self._seed_batch(m, rank_free=True)
            batch: Dict[str, Any] = {}
            for si, (spec, orders, per_source, decode) in enumerate(streams):
                good: List[Dict[str, Any]] = []
                for i, (order, n) in enumerate(zip(orders, per_source)):
                    src = spec.sources[i]
                    for _epoch, _idx, shard, t in order.positions(slot, j * n, n):
                        url = src.urls[shard]
                        samples = self._shard(cache, (si, i, slot), url, counter)
                        if t >= len(samples):         # the tar holds fewer samples than its manifest row
                            counter(CorruptMember(f"{url}: sample {t} missing (the tar has {len(samples)})"))
                            continue
                        sample = dict(samples[t])
                        if src.offsets:
                            sample["__sid__"] = src.offsets[shard] + t
                        try:
                            out = decode(sample)
                            out["__key__"] = sample.get("__key__")      # as webdataset's map keeps it
                            good.append(out)
                        except Exception as exn:  # noqa: BLE001 - counted (the handler re-raises missing files)
                            counter(exn)
                if not good:
                    good = last_good.get(si, [])
                    if not good:
                        raise RuntimeError(f"micro-batch {k}: all {spec.batch_size} samples of slot {slot} are "
                                           f"corrupt or missing ({spec.sources[0].urls[0]}…)")
                last_good[si] = good
                filled = [good[t % len(good)] for t in range(spec.batch_size)]   # corrupt ones: batch-mates
                batch.update(_collate(filled))
            batch["__corrupt__"] = torch.tensor([worker, counter.count], dtype=torch.long)
            batch["__resized__"] = torch.tensor([worker, counter.resized], dtype=torch.long)
            batch["__index__"] = torch.tensor(k, dtype=torch.long)
            batch["__global__"] = torch.tensor(m, dtype=torch.long)   # keys the step's randomness (train_step)
            yield batch
            k += L


def _batches(it: Iterator[Dict[str, Any]], batch_size: int) -> Iterator[Dict[str, Any]]:
    """Full batches only; yields as soon as a batch is full (wds.batched decodes one sample ahead, which
    would tie a sample's augmentation to the previous batch's seed)."""
    buf: List[Dict[str, Any]] = []
    for sample in it:
        buf.append(sample)
        if len(buf) == batch_size:
            yield _collate(buf)
            buf = []


def _collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], np.ndarray):
            out[key] = torch.from_numpy(np.stack(vals))
        elif isinstance(vals[0], int):
            out[key] = torch.tensor(vals, dtype=torch.long)
        else:
            out[key] = vals
    return out


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a ShardStream: ``num_workers`` processes (= the stream's lanes) or in-process (0).
    ``pin_memory``: batches land in pinned host memory (a CUDA worker's copies to the GPU are then async)."""
    if max(1, num_workers) != stream.num_lanes:
        raise ValueError(f"num_workers={num_workers} but the stream has {stream.num_lanes} lanes")
    if num_workers == 0:
        return DataLoader(stream, batch_size=None, num_workers=0, pin_memory=pin_memory)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, prefetch_factor=2,
                      multiprocessing_context="fork", persistent_workers=False, pin_memory=pin_memory)


def replay(batches: Iterator[Dict[str, Any]], n: int, pin_memory: bool = False) -> Iterator[Dict[str, Any]]:
    """The first ``n`` batches of ``batches``, kept in memory (pinned with ``pin_memory``) and cycled forever
    (``data.replay_batches``): the training loop's own speed, without the loader's. The source iterator is
    closed once they are read, so no loader process keeps running."""
    kept = []
    for _ in range(n):
        b = next(batches)
        if pin_memory:
            b = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        kept.append(b)
    close = getattr(batches, "_shutdown_workers", None)
    if close is not None:
        close()
    del batches
    while True:
        yield from kept
