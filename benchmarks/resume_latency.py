"""Resume latency: the time from building a rank's loader at micro-batch ``k`` to its first batch, for a
position near the start of the epoch and one 10x further in, under both data orders.

- ``resampled`` (the default order): a resume reads through the lane's stream up to its position
  (the samples are skipped undecoded, but every tar byte before them is read);
- ``shards`` (``data.order: shards``, ``data/order.py``): the position is a shard-level coordinate; the lane
  opens the one shard that holds it.

Target (issue 13): far / near <= 1.5 with ``order: shards``. Each latency is the min of ``--repeats`` builds
(fresh loader each time, in-process, one lane). Prints one JSON summary last.

    OMP_NUM_THREADS=1 python benchmarks/resume_latency.py [--shards 200 --per-shard 100 --near 20]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from ssfer_dist.shards.manifest import read_manifest  # noqa: E402
from ssfer_dist.data.pipeline import ShardStream, Source, StreamSpec, View, make_loader  # noqa: E402
from ssfer_dist.train.debugdata import face_images, write_shard_folder  # noqa: E402


def first_batch_s(urls, counts, order: str, start: int, batch: int, bpe: int) -> float:
    spec = StreamSpec((Source(tuple(urls), counts=tuple(counts)),), (View("image", "mae"),), batch, False)
    t0 = time.perf_counter()
    s = ShardStream([spec], img_size=32, rank=0, world_size=1, batches_per_epoch=bpe, seed=0, start_batch=start,
                    shuffle_buffer=1000, order=order, virtual_slots=1)
    next(iter(make_loader(s, 0)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--near", type=int, default=20, help="near position (micro-batches); far is 10x")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    n = a.shards * a.per_shard
    bpe = n // a.batch
    if a.near * 10 >= bpe:
        raise SystemExit(f"--near {a.near}: 10x is past the epoch ({bpe} micro-batches); add shards")
    with tempfile.TemporaryDirectory(prefix="ssfer-resume-") as tmp:
        url = write_shard_folder(os.path.join(tmp, "fr"), face_images(n, 64), [-1] * n, dataset="fr",
                                 num_classes=0, samples_per_shard=a.per_shard)
        m = read_manifest(url)
        urls, counts = m.shard_urls(), [int(s.num_samples) for s in m.shards]
        out = {}
        for order in ("resampled", "shards"):
            row = {}
            for name, k in (("near", a.near), ("far", 10 * a.near)):
                row[name] = min(first_batch_s(urls, counts, order, k, a.batch, bpe) for _ in range(a.repeats))
            row["far_vs_near"] = row["far"] / row["near"]
            out[order] = row
            print(f"{order:10s} near (micro-batch {a.near}) {row['near']:.3f} s  far ({10 * a.near}) {row['far']:.3f} s"
                  f"  far/near {row['far_vs_near']:.2f}", flush=True)
    print(json.dumps({"config": {"shards": a.shards, "per_shard": a.per_shard, "batch": a.batch, "near": a.near,
                                 "repeats": a.repeats, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
                      "latency_s": out, "target_far_vs_near": 1.5}, sort_keys=True))


if __name__ == "__main__":
    main()
