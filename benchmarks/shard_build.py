"""Benchmark: ``ssfer-shard build`` vs ``tar -cf`` on the same folder of 112x112 JPEGs, same run.

    .venv/bin/python benchmarks/shard_build.py [--num 20000] [--workers N]

Generates ``--num`` JPEGs in an image-folder layout (200 identities) in a temp folder, warms the page
cache, then times (best of ``--repeat``, each run into a fresh output: the previous one is deleted
outside the timer, for tar and the build alike):
  - ``tar -cf`` of the folder (the floor for packing files into a tar),
  - ``ssfer-shard build --image-size 112`` (pass-through: bytes copied, only JPEG headers read),
  - ``ssfer-shard build --image-size 96`` (decode + resize + re-encode).
The build runs through ``sharding.cli.main`` in this process (imports done before timing; worker
start-up is included). Prints images/s and the ratio to tar; target: pass-through >= 0.5x tar.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image
import results  # noqa: E402  (benchmarks/results.py: this folder is sys.path[0] for a script)


def make_folder(root: str, num: int, size: int, num_ids: int = 200, distinct: int = 256) -> int:
    """``num`` JPEGs under ``root/<identity>/``: smooth faces-like gradients + noise (~3-5 KB each)."""
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    blobs = []
    for i in range(distinct):
        base = np.stack([np.sin(xx * (3 + i % 7) + i) * 60 + 128, np.cos(yy * (2 + i % 5)) * 60 + 128,
                         (xx + yy) * 60 + 60], -1)
        arr = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    total = 0
    for i in range(num):
        d = os.path.join(root, f"id{i % num_ids:04d}")
        if i < num_ids:
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{i:07d}.jpg"), "wb") as f:
            f.write(blobs[i % distinct])
        total += len(blobs[i % distinct])
    return total


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--tmp", default=None, help="work folder (default: a fresh temp folder, removed)")
    a = ap.parse_args(argv)

    from sharding.cli import main as shard_main

    work = a.tmp or tempfile.mkdtemp(prefix="ssfer-bench-shard-")
    src = os.path.join(work, "images")
    try:
        t = time.perf_counter()
        nbytes = make_folder(src, a.num, 112)
        print(f"generated {a.num} JPEGs ({nbytes / 1e6:.1f} MB) in {time.perf_counter() - t:.1f}s under {src}")
        subprocess.run(["tar", "-cf", os.path.join(work, "warm.tar"), "-C", src, "."], check=True)  # page cache

        tar_out = os.path.join(work, "baseline.tar")

        def run_tar():
            subprocess.run(["tar", "-cf", tar_out, "-C", src, "."], check=True)

        def clear_tar():
            if os.path.exists(tar_out):
                os.unlink(tar_out)

        def build_out(size: int, workers: int) -> str:
            return os.path.join(work, f"shards-{size}-{workers}")

        def run_build(size: int, workers: int):
            rc = shard_main(["build", "--format", "image-folder", "--input", src, "--output", build_out(size, workers),
                             "--image-size", str(size), "--workers", str(workers), "--samples-per-shard",
                             str(a.samples_per_shard), "--no-progress"])
            assert rc == 0

        def best_of(fn, clear, n):
            """Fastest of ``n`` runs, each into a fresh (just deleted, untimed) output: the same for both."""
            out = []
            for _ in range(n):
                clear()
                out.append(timed(fn))
            return min(out)

        t_tar = best_of(run_tar, clear_tar, a.repeat)
        rows = [("tar -cf", t_tar)]
        for workers in sorted({1, a.workers}):
            rows.append((f"build pass-through 112 (workers={workers})",
                         best_of(lambda w=workers: run_build(112, w),
                                 lambda w=workers: shutil.rmtree(build_out(112, w), ignore_errors=True), a.repeat)))
        rows.append((f"build re-encode 96 (workers={a.workers})",
                     best_of(lambda: run_build(96, a.workers),
                             lambda: shutil.rmtree(build_out(96, a.workers), ignore_errors=True), 1)))
        print(f"\n{'what':<42} {'seconds':>8} {'images/s':>10} {'vs tar':>7}")
        for name, secs in rows:
            print(f"{name:<42} {secs:8.2f} {a.num / secs:10.0f} {t_tar / secs:7.2f}x")
        best_pass = min(secs for name, secs in rows if "pass-through" in name)
        ratio = t_tar / best_pass
        verdict = "OK" if ratio >= 0.5 else "BELOW TARGET"
        print(f"\npass-through / tar rate ratio: {ratio:.2f} (target >= 0.5): {verdict}")
        results.record("shard_build", results.command_line(argv),
                       {name: {"min": a.num / secs, "median": a.num / secs} for name, secs in rows},
                       unit="images/s (best run in both columns)", baseline="tar -cf",
                       note=f"{a.num} generated 112×112 JPEGs; target pass-through ≥ 0.5× tar's rate")
    finally:
        if not a.tmp:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
