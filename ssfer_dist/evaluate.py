"""``ssfer evaluate``: accuracy, mean class accuracy, per-class precision/recall/F1, macro-F1 and the
confusion matrix of a classifier on labeled shards.

Single process for small sets (shards read one after another), or ``--ray``: one Ray task per shard,
each returning its confusion matrix, summed on the driver (``RAY_ADDRESS`` is honoured, otherwise a
local Ray starts). Outputs in ``--out``: ``metrics.json``, ``confusion.json``, ``confusion.png``.

Metric definitions (``C[t, p]`` = samples of true class t predicted as p):
accuracy = trace(C) / sum(C); recall_c = C[c,c] / row_c; precision_c = C[c,c] / col_c (0 when the class
is never predicted); F1_c = harmonic mean (0 when both are 0); mean class accuracy = mean recall and
macro-F1 = mean F1, both over the classes present in the ground truth.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ssfer_dist.errors import UserError
from ssfer_dist.shards.manifest import read_manifest
from ssfer_dist.shards.safeimage import open_image
from ssfer_dist.shards.schema import decode_cls
from ssfer_dist.shards.tario import DEFAULT_MAX_MEMBER_BYTES, MemberProblem, iter_url_samples

log = logging.getLogger(__name__)

__all__ = ["confusion_metrics", "evaluate_shards", "labeled_samples", "evaluate_cli", "write_outputs", "format_table",
           "confusion_png"]


# ----------------------------------------------------------------------------- metrics (pure numpy)

def confusion_metrics(conf: np.ndarray, class_names: Sequence[str]) -> Dict[str, Any]:
    """All metrics from a confusion matrix ``conf[true, pred]`` (see the module docstring)."""
    c = np.asarray(conf, dtype=np.int64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] != len(class_names):
        raise ValueError(f"confusion must be [C, C] with C = {len(class_names)}, got {c.shape}")
    total = int(c.sum())
    tp = np.diag(c).astype(np.float64)
    support = c.sum(1).astype(np.float64)
    predicted = c.sum(0).astype(np.float64)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = support > 0
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    return {
        "num_samples": total,
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "mean_class_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": per_class,
        "class_names": list(class_names),
        "confusion": c.tolist(),
    }


def format_table(m: Dict[str, Any]) -> str:
    """A plain-text table of the per-class metrics and the summary numbers."""
    names = m["class_names"]
    w = max(9, max(len(n) for n in names))
    lines = [f"{'class':<{w}} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}"]
    for n in names:
        r = m["per_class"][n]
        lines.append(f"{n:<{w}} {r['precision']:>9.3f} {r['recall']:>7.3f} {r['f1']:>6.3f} {r['support']:>8d}")
    lines.append("")
    lines.append(f"accuracy {m['accuracy']:.4f}  mean class accuracy {m['mean_class_accuracy']:.4f}  "
                 f"macro-F1 {m['macro_f1']:.4f}  ({m['num_samples']} samples)")
    return "\n".join(lines)


def confusion_png(conf: np.ndarray, class_names: Sequence[str], path: str, title: str = "") -> None:
    """Draw the confusion matrix (rows = true, columns = predicted; shade = row-normalised) as a PNG."""
    from PIL import Image, ImageDraw, ImageFont

    c = np.asarray(conf, dtype=np.int64)
    n = len(class_names)
    cell, left, top = 56, 96, 40 + (16 if title else 0)
    img = Image.new("RGB", (left + n * cell + 10, top + n * cell + 30), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    if title:
        d.text((4, 4), title, fill="black", font=font)
    rows = c.sum(1, keepdims=True).astype(np.float64)
    frac = np.divide(c, rows, out=np.zeros(c.shape, dtype=np.float64), where=rows > 0)
    for i in range(n):
        d.text((4, top + i * cell + cell // 2 - 6), class_names[i][:14], fill="black", font=font)
        d.text((left + i * cell + 2, top - 16), class_names[i][:9], fill="black", font=font)
        for j in range(n):
            v = frac[i, j]
            fade = int(255 - 200 * v)
            shade = (fade, int(255 - 140 * v), 255) if i == j else (255, fade, fade)
            x0, y0 = left + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=shade, outline=(160, 160, 160))
            d.text((x0 + 6, y0 + cell // 2 - 6), str(int(c[i, j])), fill="black", font=font)
    d.text((left, top + n * cell + 8), "rows: true class, columns: predicted", fill="black", font=font)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- reading shards

def _load_model(weights: str):
    from ssfer_dist.models.io import classifier_from_weights, load_weights   # torch: imported on first use

    _, meta = load_weights(weights)
    if meta.get("kind") != "classifier":
        raise UserError(f"{weights}: is a {meta.get('kind')!r} weights file, evaluate/predict need a classifier "
                        f"(the export of a fine-tuning stage)")
    model, meta = classifier_from_weights(weights)
    model.eval()
    return model, meta


def _shard_confusion(shard_url: str, weights_blob: bytes, num_classes: int, batch_size: int,
                     max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Tuple[np.ndarray, int]:
    """Confusion matrix of one shard (runs in the driver or in a Ray task); returns (conf, corrupt)."""
    import tempfile


    with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as f:
        f.write(weights_blob)
        path = f.name
    try:
        model, meta = _load_model(path)
    finally:
        os.remove(path)
    return _confusion_with(model, meta, shard_url, num_classes, batch_size, max_member_bytes)


def _confusion_with(model, meta, shard_url: str, num_classes: int, batch_size: int,
                    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Tuple[np.ndarray, int]:
    import torch

    from ssfer_dist.data.transforms import build_transform, normalize_on_device

    tf = build_transform("eval", int(meta["arch"]["img_size"]), uint8=True)
    mean, std = meta.get("mean"), meta.get("std")
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    counts = {"corrupt": 0}
    xs: List[torch.Tensor] = []
    ys: List[int] = []

    def flush():
        if not xs:
            return
        with torch.no_grad():
            x = normalize_on_device(torch.stack(xs), mean, std)
            pred = model(x).argmax(1).numpy()
        np.add.at(conf, (np.asarray(ys), pred), 1)
        xs.clear()
        ys.clear()

    for x, y in labeled_samples([shard_url], tf, num_classes, max_member_bytes, counts=counts):
        xs.append(x)
        ys.append(y)
        if len(xs) >= batch_size:
            flush()
    flush()
    return conf, counts["corrupt"]


def labeled_samples(shard_urls: Sequence[str], tf, num_classes: int,
                    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, rank: int = 0, world: int = 1,
                    counts: Optional[Dict[str, int]] = None) -> Iterator[Tuple[Any, int]]:
    """(transformed image, label) of every labeled sample of ``shard_urls`` in order. With ``world`` > 1 only
    the samples ``i % world == rank`` (``i`` counts the tar samples over all shards; the others are not
    decoded): ranks evaluate disjoint slices that together cover the set. Corrupt or refused samples of the
    slice are skipped and counted in ``counts["corrupt"]``."""

    counts = {} if counts is None else counts
    counts.setdefault("corrupt", 0)
    i = -1
    for url in shard_urls:
        refused: List[MemberProblem] = []
        for key, s in iter_url_samples(url, max_member_bytes, refused):
            i += 1
            if i % world != rank:
                continue
            try:
                y = decode_cls(s["cls"])
                img = open_image(s["jpg"])          # header size checked before decoding (bombs)
                img.load()
                x, _ = tf(img.convert("RGB"), None)
            except Exception as e:  # corrupt samples are counted, not fatal
                counts["corrupt"] += 1
                log.warning("%s: skipping sample %s (%s)", url, key, type(e).__name__)
                continue
            if not 0 <= y < num_classes:
                counts["corrupt"] += 1
                continue
            yield x, y
        for p in refused:
            log.warning("%s: refused %s", url, p)
        if world == 1 or rank == 0:      # refused members hold no sample index: one rank counts them
            counts["corrupt"] += len(refused)


def evaluate_shards(weights: str, shards: str, batch_size: int = 128, use_ray: bool = False,
                    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Dict[str, Any]:
    """Evaluate classifier ``weights`` on the labeled shard folder ``shards`` -> metrics dict
    (see :func:`confusion_metrics`, plus ``weights``, ``shards``, ``num_corrupt``)."""
    import torch

    model, meta = _load_model(weights)
    man = read_manifest(shards, with_index=False)
    if man.num_classes == 0:
        raise UserError(f"{shards}: the shards are unlabeled (manifest num_classes = 0); evaluate needs labels")
    nc = int(meta["arch"]["num_classes"])
    if nc != man.num_classes:
        raise UserError(f"{weights}: the classifier has {nc} classes but the shards at {shards} have "
                        f"{man.num_classes}")
    names = list(meta.get("class_names") or man.class_names)[:nc]
    conf = np.zeros((nc, nc), dtype=np.int64)
    corrupt = 0
    urls = man.shard_urls()
    if use_ray:
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True,
                     include_dashboard=False, log_to_driver=False)
        blob_path = weights if not os.path.isdir(weights) else os.path.join(weights, "model.safetensors")
        with open(blob_path, "rb") as f:
            blob = ray.put(f.read())
        task = ray.remote(num_cpus=1)(_shard_confusion)
        for c, k in ray.get([task.remote(u, blob, nc, batch_size, max_member_bytes) for u in urls]):
            conf += c
            corrupt += k
    else:
        torch.set_grad_enabled(False)
        try:
            for u in urls:
                c, k = _confusion_with(model, meta, u, nc, batch_size, max_member_bytes)
                conf += c
                corrupt += k
        finally:
            torch.set_grad_enabled(True)
    if int(conf.sum()) == 0:
        raise UserError(f"{shards}: no sample could be evaluated ({corrupt} corrupt or refused, "
                        f"manifest lists {man.num_samples}); run `ssfer-shard verify {shards}`")
    m = confusion_metrics(conf, names)
    m.update(weights=str(weights), shards=str(shards), num_corrupt=corrupt)
    if corrupt:
        log.warning("%d corrupt samples skipped", corrupt)
    return m


def write_outputs(m: Dict[str, Any], out: str, title: str = "") -> Dict[str, str]:
    """Write ``metrics.json``, ``confusion.json`` and ``confusion.png`` into ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = {"metrics": os.path.join(out, "metrics.json"), "confusion_json": os.path.join(out, "confusion.json"),
             "confusion_png": os.path.join(out, "confusion.png")}
    for key, obj in (("metrics", m), ("confusion_json", {"class_names": m["class_names"], "confusion": m["confusion"],
                                                         "rows": "true", "columns": "predicted"})):
        tmp = paths[key] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        os.replace(tmp, paths[key])
    confusion_png(np.asarray(m["confusion"]), m["class_names"], paths["confusion_png"], title=title)
    return paths


def evaluate_cli(weights: str, shards: str, out: Optional[str] = None, batch_size: int = 128,
                 use_ray: bool = False, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> int:
    """``ssfer evaluate``: print the table; write the files into ``out`` when given."""
    m = evaluate_shards(weights, shards, batch_size=batch_size, use_ray=use_ray, max_member_bytes=max_member_bytes)
    print(format_table(m))
    if m["num_corrupt"]:
        print(f"({m['num_corrupt']} corrupt samples skipped)")
    if out:
        paths = write_outputs(m, out, title=os.path.basename(str(weights)))
        print(f"wrote {paths['metrics']}, {paths['confusion_json']}, {paths['confusion_png']}")
    return 0
