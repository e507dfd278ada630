"""Decode + augment throughput per worker process: our shard pipeline vs torchvision ImageFolder + PIL.

Same 112-px JPEGs (real faces from scikit-image, written once as shards and once as an ImageFolder tree,
byte-identical), 224-px output, MAE augmentation (RandomResizedCrop 0.2-1 bicubic + flip), one process:

- ``decode-only``      PIL decode of the shard JPEGs, no augmentation (the ceiling);
- ``ours uint8``       ``ShardStream`` (tar streaming → decode → FaceTransform → uint8 batch; the float
                        normalisation happens on the device: ``normalize_on_device``);
- ``ours float``       the same with normalisation on the CPU;
- ``ImageFolder``      ``torchvision.datasets.ImageFolder`` + RandomResizedCrop/flip/ToTensor/Normalize.

    python benchmarks/loader.py [--images 3000] [--batch 64]

Prints img/s per row and the ratio ours-uint8 / ImageFolder (target >= 1.5x).
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


def build_data(root: str, n: int, size: int = 112):
    from ssfer_dist.data.manifest import read_manifest
    from ssfer_dist.train.debugdata import face_images, write_shard_folder

    imgs = face_images(n, size, seed=1)
    classes = [i % 7 for i in range(n)]
    shards = write_shard_folder(os.path.join(root, "shards"), imgs, classes, dataset="bench", num_classes=7,
                                samples_per_shard=500)
    folder = os.path.join(root, "imagefolder")
    for url in read_manifest(shards).shard_urls():
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

    t = time.perf_counter()
    count = 0
    for s in wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples()):
        np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        count += 1
        if count >= n:
            break
    return count / (time.perf_counter() - t)


def bench_ours(urls, n, batch, uint8):
    from ssfer_dist.data.pipeline import ShardStream, Source, StreamSpec, View, make_loader

    stream = ShardStream([StreamSpec((Source(tuple(urls)),), (View("image", "mae"),), batch, False)], img_size=224,
                         rank=0, world_size=1, batches_per_epoch=10 ** 6, seed=0, shuffle_buffer=256, uint8=uint8,
                         num_lanes=1)
    it = iter(make_loader(stream, 0))
    next(it)                                             # warm-up (fills the shuffle buffer)
    t = time.perf_counter()
    count = 0
    while count < n:
        b = next(it)
        count += b["image"].shape[0]
    return count / (time.perf_counter() - t)


def bench_imagefolder(folder, n, batch):
    import torchvision
    from torchvision import transforms as T

    from ssfer_dist.data.schema import FACE_MEAN, FACE_STD

    tf = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(FACE_MEAN, FACE_STD)])
    ds = torchvision.datasets.ImageFolder(folder, transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0)
    it = iter(dl)
    next(it)
    t = time.perf_counter()
    count = 0
    while count < n:
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(dl)
            continue
        count += x.shape[0]
    return count / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="best of N per row")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from ssfer_dist.data.manifest import read_manifest

    with tempfile.TemporaryDirectory() as root:
        shards, folder = build_data(root, a.images)
        urls = read_manifest(shards).shard_urls()
        rows = {}
        for _ in range(a.repeats):
            for name, fn in (("decode-only", lambda: bench_decode_only(urls, a.images)),
                             ("ours uint8", lambda: bench_ours(urls, a.images, a.batch, True)),
                             ("ours float", lambda: bench_ours(urls, a.images, a.batch, False)),
                             ("ImageFolder", lambda: bench_imagefolder(folder, a.images, a.batch))):
                rows[name] = max(rows.get(name, 0.0), fn())
    print(f"{a.images} JPEGs at 112 px → 224 px MAE augmentation, 1 worker process, batch {a.batch}")
    for name, v in rows.items():
        print(f"{name:12s} {v:8.1f} img/s   {v / rows['ImageFolder']:.2f}x ImageFolder")
    ratio = rows["ours uint8"] / rows["ImageFolder"]
    print(f"\nours (uint8, normalise on device) / ImageFolder = {ratio:.2f}x  (target >= 1.5x: "
          f"{'met' if ratio >= 1.5 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
