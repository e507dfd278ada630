"""CPU work per image in the loader, one worker process: our shard pipeline vs decode-only vs ImageFolder + PIL.

Same 112-px JPEGs (real faces from scikit-image, written once as shards and once as an ImageFolder tree,
byte-identical), 224-px MAE views (RandomResizedCrop 0.2-1 bicubic + flip), one process, rows interleaved
per repeat:

- ``decode-only``      PIL decode of the shard JPEGs to uint8, no augmentation (the ceiling);
- ``decode-only tv``   the same with ``torchvision.io.decode_jpeg`` (what the workers use for decode-only views
                        when PIL's draft cannot help: same pixels, no Python header parse);
- ``ours aug=device``  ``ShardStream`` with ``data.augment_on: device``: tar → decode → uint8 batch at the
                        stored size + boxes; crop/flip/resize happen on the training device (``DeviceAugment``);
- ``ours dec=device``  ``data.decode: device``: the worker ships JPEG bytes (header read only);
- ``ours aug=cpu``     ``augment_on: cpu``: the whole view on the CPU (uint8, normalised on the device);
- ``ImageFolder``      ``torchvision.datasets.ImageFolder`` + RandomResizedCrop/flip/ToTensor/Normalize.

Then the device-side cost per batch measured here on the CPU (``DeviceAugment`` 112 → 224 bicubic, and the
batched ``decode_jpeg``), the strong view's RandAugment per image, and the cores per H200 the figures imply.

    OMP_NUM_THREADS=1 python benchmarks/loader.py [--images 3000] [--batch 64] [--repeats 3]

Prints min / median img/s over the repeats and the ratios aug=device / decode-only (target >= 0.8) and
aug=device / ImageFolder (target >= 3).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

SHUFFLE = 256                                            # the pipeline's shuffle buffer here


def _clock():
    """(wall, CPU time of this process): on a shared machine CPU seconds say what the work costs."""
    return time.perf_counter(), time.process_time()


def _rates(count, t):
    """(img/s wall clock, img per CPU-second of this process)."""
    return count / (time.perf_counter() - t[0]), count / (time.process_time() - t[1])


def _as_shard_build_writes_it(url: str) -> None:
    """Rewrite a tar as ``ssfer-shard build`` writes shards (sharding.writer.SampleTarWriter: plain USTAR
    headers; webdataset's TarWriter adds a pax header per member, which doubles Python's tar parsing)."""
    from sharding.writer import SampleTarWriter

    with tarfile.open(url) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    with open(url, "wb") as f:
        w = SampleTarWriter(f)
        key, parts = None, []
        for name, data in members + [(None, None)]:
            k, ext = (name.split(".", 1) if name else (None, None))
            if k != key and parts:
                w.write_members(key, sorted(parts))
                parts = []
            key = k
            if name:
                parts.append((ext, data))
        w.close()


def build_data(root: str, n: int, size: int = 112):
    from ssfer_dist.shards.manifest import read_manifest
    from ssfer_dist.train.debugdata import face_images, write_shard_folder

    imgs = face_images(n, size, seed=1)
    classes = [i % 7 for i in range(n)]
    shards = write_shard_folder(os.path.join(root, "shards"), imgs, classes, dataset="bench", num_classes=7,
                                samples_per_shard=500)
    folder = os.path.join(root, "imagefolder")
    for url in read_manifest(shards).shard_urls():
        _as_shard_build_writes_it(url)
        with tarfile.open(url) as tf:
            members = {m.name: m for m in tf.getmembers()}
            for name, m in members.items():
                if not name.endswith(".jpg"):
                    continue
                cls = tf.extractfile(members[name[:-4] + ".cls"]).read().decode()
                d = os.path.join(folder, cls)
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, os.path.basename(name)), "wb") as f:
                    f.write(tf.extractfile(m).read())
    return shards, folder


def bench_decode_only(urls, n):
    import numpy as np
    import webdataset as wds
    from PIL import Image

    t = _clock()
    count = 0
    for s in wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples()):
        np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        count += 1
        if count >= n:
            break
    return _rates(count, t)


def bench_decode_only_tv(urls, n):
    """The same with torchvision's decode_jpeg (libjpeg-turbo without PIL's Python header parse)."""
    import webdataset as wds

    from ssfer_dist.data.pipeline import decode_hwc

    t = _clock()
    count = 0
    for s in wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples()):
        decode_hwc(s["jpg"])
        count += 1
        if count >= n:
            break
    return _rates(count, t)


def bench_ours(urls, n, batch, augment_on="device", decode="cpu"):
    from ssfer_dist.data.device_aug import place_views
    from ssfer_dist.data.pipeline import ShardStream, Source, StreamSpec, View, make_loader

    views = place_views((View("image", "mae"),), augment_on)
    stream = ShardStream([StreamSpec((Source(tuple(urls)),), views, batch, False, raw_size=112)], img_size=224,
                         rank=0, world_size=1, batches_per_epoch=10 ** 6, seed=0, shuffle_buffer=SHUFFLE, uint8=True,
                         num_lanes=1, decode=decode, draft=True)
    it = iter(make_loader(stream, 0))
    for _ in range(SHUFFLE // batch + 2):               # warm-up: fill the shuffle buffer (steady state after)
        next(it)
    t = _clock()
    count = 0
    while count < n:
        b = next(it)
        count += len(b["image"])
    return _rates(count, t)


def device_side_cost(urls, batch, reps=5):
    """ms per batch of the device half, run on this CPU: DeviceAugment (112 → 224) and batched decode_jpeg."""
    from ssfer_dist.data.device_aug import DeviceAugment, decode_jpegs, place_views
    from ssfer_dist.data.pipeline import ShardStream, Source, StreamSpec, View, make_loader

    views = place_views((View("image", "mae"),), "device")
    out = {}
    for decode in ("cpu", "device"):
        stream = ShardStream([StreamSpec((Source(tuple(urls)),), views, batch, False, raw_size=112)], img_size=224,
                             rank=0, world_size=1, batches_per_epoch=10 ** 6, seed=0, shuffle_buffer=256,
                             num_lanes=1, decode=decode)
        b = next(iter(make_loader(stream, 0)))
        if decode == "device":
            t = _clock()
            for _ in range(reps):
                decode_jpegs(b["image"], torch.device("cpu"))
            out["decode_jpeg (batch, CPU)"] = (time.process_time() - t[1]) / reps * 1e3
            continue
        for mode in ("bicubic", "bilinear"):
            aug = DeviceAugment({"image": "mae"}, 224, seed=0, rank=0, interpolation=mode)
            aug(b, 0)
            t = _clock()
            for i in range(reps):
                aug(b, i)
            out[f"DeviceAugment {mode}"] = (time.process_time() - t[1]) / reps * 1e3
    return out


def strong_view_cost(urls, n=300):
    """ms per image of the CPU-side views: full weak view (crop/flip/resize) and strong (+ RandAugment)."""
    import webdataset as wds

    from ssfer_dist.data.pipeline import decode_image
    from ssfer_dist.data.transforms import build_transform

    imgs = []
    for s in wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples()):
        imgs.append(decode_image(s["jpg"])[0])
        if len(imgs) >= n:
            break
    out = {}
    for kind in ("weak", "strong"):
        tf = build_transform(kind, 224, uint8=True)
        t = _clock()
        for im in imgs:
            tf(im, None)
        out[kind] = (time.process_time() - t[1]) / len(imgs) * 1e3
    return out


def bench_imagefolder(folder, n, batch):
    import torchvision
    from torchvision import transforms as T

    from ssfer_dist.shards.schema import FACE_MEAN, FACE_STD

    tf = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(FACE_MEAN, FACE_STD)])
    ds = torchvision.datasets.ImageFolder(folder, transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0)
    it = iter(dl)
    next(it)
    t = _clock()
    count = 0
    while count < n:
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(dl)
            continue
        count += x.shape[0]
    return _rates(count, t)


def main(argv=None) -> int:
    import statistics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="runs per row (interleaved); min and median printed")
    ap.add_argument("--gpu-img-per-s", type=float, default=5400.0,
                    help="images/s one H200 consumes (ViT-B/16 MAE, 224 px, ~58 GFLOP/img fwd+bwd at 40%% of "
                         "~790 TFLOP/s bf16)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from ssfer_dist.shards.manifest import read_manifest

    with tempfile.TemporaryDirectory() as root:
        shards, folder = build_data(root, a.images)
        urls = read_manifest(shards).shard_urls()
        rows = {}
        for _ in range(a.repeats):
            for name, fn in (("decode-only", lambda: bench_decode_only(urls, a.images)),
                             ("decode-only tv", lambda: bench_decode_only_tv(urls, a.images)),
                             ("ours aug=device", lambda: bench_ours(urls, a.images, a.batch, "device")),
                             ("ours dec=device", lambda: bench_ours(urls, a.images, a.batch, "device", "device")),
                             ("ours aug=cpu", lambda: bench_ours(urls, a.images, a.batch, "cpu")),
                             ("ImageFolder", lambda: bench_imagefolder(folder, a.images, a.batch))):
                rows.setdefault(name, []).append(fn())
        dev = device_side_cost(urls, a.batch)
        cpu_views = strong_view_cost(urls)
    print(f"{a.images} JPEGs at 112 px → 224 px MAE views, 1 process, batch {a.batch}, torch threads 1, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {a.repeats} runs, "
          f"{os.cpu_count()} cores seen, load average {os.getloadavg()[0]:.1f}")
    med = {}
    for col, title in ((1, "img per CPU-second of the process (the CPU work per image; robust to a shared machine)"),
                       (0, "img/s wall clock")):
        print(f"\n{title}\n{'row':16s} {'min':>8s} {'median':>8s}   median vs ImageFolder / decode-only")
        m = {k: statistics.median(x[col] for x in v) for k, v in rows.items()}
        for name, v in rows.items():
            print(f"{name:16s} {min(x[col] for x in v):8.1f} {m[name]:8.1f}   {m[name] / m['ImageFolder']:5.2f}x"
                  f"   {m[name] / m['decode-only']:5.2f}x")
        r_dec = m["ours aug=device"] / m["decode-only"]
        r_if = m["ours aug=device"] / m["ImageFolder"]
        print(f"aug=device / decode-only = {r_dec:.2f}x (target >= 0.8: {'met' if r_dec >= 0.8 else 'NOT met'}); "
              f"aug=device / ImageFolder = {r_if:.2f}x (target >= 3: {'met' if r_if >= 3 else 'NOT met'})")
        med = med or m
    print(f"\ndevice-side work per batch of {a.batch}, run on this CPU (1 thread, CPU time):")
    for k, v in dev.items():
        print(f"  {k:28s} {v:8.1f} ms/batch  ({v / a.batch:.2f} ms/img)")
    print("CPU-side views per image (decoded 112-px input → 224 px, CPU time):")
    for k, v in cpu_views.items():
        print(f"  {k:28s} {v:8.2f} ms/img" + ("  (RandAugment stays on the CPU)" if k == "strong" else ""))
    g = a.gpu_img_per_s
    print(f"\ncores per H200 for ViT-B/16 MAE at 224 px (assumed {g:,.0f} img/s per GPU), one loader process per "
          "core, from the median img per CPU-second:")
    for name in ("ours aug=device", "ours dec=device", "ours aug=cpu", "ImageFolder"):
        print(f"  {name:16s} {g / med[name]:5.1f} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
