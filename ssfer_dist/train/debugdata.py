"""Tiny shard folders for the debug configs and tests (real faces from scikit-image, class-coded tints).

``write_debug_shards(root)`` writes, following ``ssfer_dist.shards.schema`` and ``ssfer_dist.shards.manifest``:

- ``root/fr``              unlabeled "face recognition" shards (MAE pretraining, unlabeled stream);
- ``root/fer_split/labeled``     labeled FER shards (7 classes);
- ``root/fer_split/unlabeled``   the FER remainder (labels kept in ``cls`` for pseudo-label accuracy);
- ``root/fer_test``              a labeled test split.

The folder names are those ``ssfer demo`` writes under ``<out>/seed<N>/shards`` (its ``fer_train`` is
the folder it splits), so the debug configs read either: ``ssfer-demo/seed0/shards/...``.

Classes are made learnable by a per-class colour tint and bar position on top of the face.
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Dict, List, Optional

import numpy as np

from ssfer_dist import storage
from ssfer_dist.shards.manifest import ShardInfo, class_hist_of, write_manifest
from ssfer_dist.shards.schema import SampleMeta, make_key, sample_to_members

__all__ = ["write_debug_shards", "write_shard_folder", "face_images"]


def face_images(n: int, size: int, seed: int = 0) -> List[np.ndarray]:
    """``n`` RGB uint8 faces of ``size`` px from ``skimage.data.lfw_subset`` (repeated, jittered)."""
    from PIL import Image
    from skimage import data

    faces = data.lfw_subset()                      # [200, 25, 25] float in [0, 1]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        f = faces[i % len(faces)]
        img = Image.fromarray((f * 255).astype(np.uint8)).convert("RGB").resize((size, size), Image.BICUBIC)
        a = np.asarray(img).astype(np.float32) * rng.uniform(0.8, 1.2) + rng.normal(0, 4, (size, size, 3))
        out.append(np.clip(a, 0, 255).astype(np.uint8))
    return out


def _tint(img: np.ndarray, cls: int) -> np.ndarray:
    a = img.astype(np.float32)
    hue = np.array([[1.0, 0.6, 0.6], [0.6, 1.0, 0.6], [0.6, 0.6, 1.0], [1.0, 1.0, 0.5], [1.0, 0.5, 1.0],
                    [0.5, 1.0, 1.0], [0.8, 0.8, 0.8], [1.0, 0.8, 0.5]])[cls % 8]
    a = a * hue
    s = img.shape[0]
    y = int((cls + 0.5) * s / 8)
    a[max(0, y - 1):y + 1, :, :] = 255.0
    return np.clip(a, 0, 255).astype(np.uint8)


def write_shard_folder(folder: str, images: List[np.ndarray], classes: List[int], *, dataset: str,
                       num_classes: int, samples_per_shard: int = 16, role: str = "all",
                       corrupt_every: int = 0) -> str:
    """Write ``<dataset>-%06d.tar`` shards + ``manifest.parquet`` into ``folder`` (local or s3://).

    ``corrupt_every`` > 0 replaces every n-th JPEG with garbage bytes (to test the skip-and-count path).
    """
    import webdataset as wds
    from PIL import Image

    storage.ensure_dir(folder) if storage.is_s3(folder) else os.makedirs(folder, exist_ok=True)
    shards = []
    size = images[0].shape[0]
    for si, start in enumerate(range(0, len(images), samples_per_shard)):
        name = f"{dataset}-{si:06d}.tar"
        buf = io.BytesIO()
        keys, cls_list = [], []
        with wds.TarWriter(buf) as w:
            for i in range(start, min(len(images), start + samples_per_shard)):
                jb = io.BytesIO()
                Image.fromarray(images[i]).save(jb, format="JPEG", quality=90)
                jpeg = jb.getvalue()
                if corrupt_every and (i + 1) % corrupt_every == 0:
                    jpeg = b"not a jpeg" * 10
                c = int(classes[i])
                meta = SampleMeta(source=dataset, source_id=f"img{i:05d}", box=(size * 0.15, size * 0.1,
                                  size * 0.85, size * 0.9), orig_size=(size, size), box_source="frame", cls=c)
                key = make_key(dataset, f"img{i:05d}")
                w.write(sample_to_members(key, jpeg, meta))
                keys.append(key)
                cls_list.append(c)
        data = buf.getvalue()
        url = storage.join(folder, name)
        storage.put_bytes(url, data)
        shards.append(ShardInfo(name=name, url=url, num_samples=len(keys), num_bytes=len(data),
                                sha256=hashlib.sha256(data).hexdigest(),
                                class_hist=class_hist_of(cls_list, num_classes), keys=keys, classes=cls_list))
    write_manifest(folder, shards, dataset=dataset, image_size=size, num_classes=num_classes, role=role)
    return folder


DEFAULT_ROOT = "ssfer-demo/seed0/shards"     # where `ssfer demo` (seed 0) puts its shards; the debug configs read it


def write_debug_shards(root: str, image_size: int = 32, num_fr: int = 256, num_fer: int = 224,
                       labeled_fraction: float = 0.25, num_test: int = 70, seed: int = 0,
                       corrupt_every: int = 0) -> Dict[str, str]:
    """The debug data set under ``root``; returns ``{"fr", "labeled", "unlabeled", "test"}`` folders."""
    rng = np.random.default_rng(seed)
    fr = face_images(num_fr, image_size, seed)
    out = {"fr": storage.join(root, "fr"), "labeled": storage.join(root, "fer_split", "labeled"),
           "unlabeled": storage.join(root, "fer_split", "unlabeled"), "test": storage.join(root, "fer_test")}
    write_shard_folder(out["fr"], fr, [-1] * num_fr, dataset="fr", num_classes=0, role="all",
                       corrupt_every=corrupt_every)
    fer_cls = [int(c) for c in rng.integers(0, 7, num_fer)]
    fer = [_tint(im, c) for im, c in zip(face_images(num_fer, image_size, seed + 1), fer_cls)]
    n_lab = max(14, int(num_fer * labeled_fraction))
    write_shard_folder(out["labeled"], fer[:n_lab], fer_cls[:n_lab], dataset="fer", num_classes=7, role="labeled")
    write_shard_folder(out["unlabeled"], fer[n_lab:], fer_cls[n_lab:], dataset="ferU", num_classes=7,
                       role="unlabeled")
    test_cls = [i % 7 for i in range(num_test)]
    test = [_tint(im, c) for im, c in zip(face_images(num_test, image_size, seed + 2), test_cls)]
    write_shard_folder(out["test"], test, test_cls, dataset="fertest", num_classes=7, role="all")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m ssfer_dist.train.debugdata ROOT``: write the debug shard folders."""
    import sys

    root = (argv or sys.argv[1:] or [DEFAULT_ROOT])[0]
    if os.path.normpath(root) == os.path.normpath(DEFAULT_ROOT):
        # mark ssfer-demo/ as a demo folder (ssfer_dist.demo.MARKER), so a later `ssfer demo` may reuse it
        os.makedirs("ssfer-demo", exist_ok=True)
        open(os.path.join("ssfer-demo", ".ssfer-demo"), "a").close()
    for k, v in write_debug_shards(root).items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
