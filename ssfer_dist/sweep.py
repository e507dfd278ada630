"""``ssfer sweep SWEEP.yaml``: label fractions × folds × models, one training run per cell, ending in the
paper's table (mean ± std over folds per fraction and model) as Markdown and CSV.

For each fraction ``f`` and fold ``k`` the labeled training shards are split as ``ssfer-shard split`` does
(``sharding.split.split_shards``: per class, seed ``seed + k``) into ``<sweep>/splits/f<f>-k<k>/``
{``labeled``, ``unlabeled``}. Each model then trains on that split — from its YAML, with ``data.shards`` the
labeled part; a semi-supervised model adds the unlabeled remainder in front of its own ``data.unlabeled``
sources; ``init_from`` starts a model from another model's export of the same cell (SSFER: FaceMix →
semi-supervised) — and its export is evaluated on the test shards (``ssfer evaluate``'s metrics).

**Resumable.** A finished cell is a file ``<sweep>/cells/f<f>-k<k>-<model>.json`` (written last); a rerun
skips it, and a split whose manifest exists is reused. A cell's run that was interrupted resumes from its
checkpoint (its run name is fixed: ``<sweep>-f<f>-k<k>-<model>``).

Cells run one after another, each as one stage on the chosen launcher (``ray``: the local Ray or the cluster
in ``RAY_ADDRESS``, started once and reused; ``torchrun``: ``scaling.num_workers`` processes here).

Like ``ssfer_dist/demo.py`` this is an application above both the shard tools and the trainer: it imports
``sharding`` (the split) — no library module of ``ssfer_dist`` does.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from sharding.split import split_shards
from ssfer_dist import console, storage
from ssfer_dist.config import from_dict, load_typed, to_dict
from ssfer_dist.evaluate import evaluate_shards
from ssfer_dist.launchers import run_config
from ssfer_dist.stages import check_stage_config, load_stage_config
from ssfer_dist.typed import ConfigError

log = logging.getLogger(__name__)

__all__ = ["SweepCfg", "load_sweep", "run_sweep", "summarize", "sweep_from_cli"]

METRICS = ("accuracy", "mean_class_accuracy", "macro_f1")


@dataclass(frozen=True)
class SweepModel:
    name: str = ""                    # row label in the table, and part of the run names
    config: str = ""                  # a stage YAML (relative to the sweep file)
    overrides: List[str] = field(default_factory=list)
    init_from: Optional[str] = None   # start from this model's export of the same cell


@dataclass(frozen=True)
class SweepData:
    labeled: str = ""                 # the full labeled training shards (split per fraction and fold)
    test: str = ""                    # labeled test shards (every cell is evaluated on them)
    samples_per_shard: int = 1000     # of the split's shards
    remainder_weight: float = 0.5     # semi-supervised models: mixing weight of the split's unlabeled remainder


@dataclass(frozen=True)
class SweepCfg:
    name: str = ""
    storage: str = "runs/sweeps"      # <storage>/<name>/: splits, cells, runs, table.md, table.csv
    data: SweepData = field(default_factory=SweepData)
    fractions: List[float] = field(default_factory=list)
    folds: int = 3
    seed: int = 0
    launcher: str = "ray"             # ray | torchrun
    models: List[SweepModel] = field(default_factory=list)


def load_sweep(path: str, overrides: Optional[List[str]] = None) -> SweepCfg:

    cfg = load_typed(path, SweepCfg, overrides)

    def err(key: str, msg: str) -> None:
        raise ConfigError(f"{path}: {key}: {msg}")

    if not cfg.name or "/" in cfg.name:
        err("name", f"expected a name without '/', got {cfg.name!r}")
    if not cfg.data.labeled:
        err("data.labeled", "expected the labeled training shard folder/URL")
    if not cfg.data.test:
        err("data.test", "expected the labeled test shard folder/URL")
    if not cfg.fractions:
        err("fractions", "expected a non-empty list of label fractions in (0, 1)")
    for i, f in enumerate(cfg.fractions):
        if not 0.0 < f < 1.0:
            err(f"fractions[{i}]", f"expected a fraction in (0, 1), got {f}")
    if cfg.folds < 1:
        err("folds", f"expected >= 1, got {cfg.folds}")
    if cfg.launcher not in ("ray", "torchrun"):
        err("launcher", f"expected ray or torchrun, got {cfg.launcher!r}")
    if not cfg.models:
        err("models", "expected at least one model (name, config)")
    base = os.path.dirname(os.path.abspath(path))
    names: List[str] = []
    models = []
    for i, m in enumerate(cfg.models):
        if not m.name or "/" in m.name or m.name in names:
            err(f"models[{i}].name", f"expected a unique name without '/', got {m.name!r}")
        if not m.config:
            err(f"models[{i}].config", "expected a stage YAML path")
        if m.init_from is not None and m.init_from not in names:
            err(f"models[{i}].init_from", f"expected the name of a model listed before it ({names}), "
                                          f"got {m.init_from!r}")
        names.append(m.name)
        p = m.config if os.path.isabs(m.config) else os.path.join(base, m.config)
        models.append(dataclasses.replace(m, config=p))
    root = cfg.storage if storage.is_s3(cfg.storage) or os.path.isabs(cfg.storage) else os.path.abspath(cfg.storage)
    return dataclasses.replace(cfg, models=models, storage=root)


def _ftag(f: float) -> str:
    return f"{round(f * 100, 4):g}".replace(".", "p")


def cell_name(f: float, k: int, model: str) -> str:
    return f"f{_ftag(f)}-k{k}-{model}"


def _stage_config(sw: SweepCfg, m: SweepModel, f: float, k: int, split: str, exports: Dict[str, str]):

    ov = list(m.overrides) + [f"run.storage={storage.join(sw.storage, sw.name, 'runs')}",
                              f"run.name={sw.name}-{cell_name(f, k, m.name)}",
                              f"data.shards={storage.join(split, 'labeled')}", f"run.seed={sw.seed + k}"]
    if m.init_from is not None:
        ov.append(f"init.weights={exports[m.init_from]}")
    cfg = load_stage_config(m.config, ov)
    if cfg.train.stage == "semisup":                  # the split's remainder first, then the model's own sources
        d = to_dict(cfg)
        d["data"]["unlabeled"] = [{"shards": storage.join(split, "unlabeled"), "weight": sw.data.remainder_weight}] + \
            list(d["data"].get("unlabeled") or [])
        cfg = check_stage_config(from_dict(d), m.config)
    return cfg


def run_sweep(sw: SweepCfg) -> Dict[str, Any]:
    """Every cell not yet finished, then the table. Returns the summary (also ``<sweep>/summary.json``)."""
    root = storage.join(sw.storage, sw.name)
    cells_dir = storage.join(root, "cells")
    total = len(sw.fractions) * sw.folds * len(sw.models)
    done = 0
    t0 = time.time()
    for f in sw.fractions:
        for k in range(sw.folds):
            split = storage.join(root, "splits", f"f{_ftag(f)}-k{k}")
            if not storage.exists(storage.join(split, "unlabeled", "manifest.parquet")):
                counts = split_shards(sw.data.labeled, split, fraction=f, per_class=True, seed=sw.seed + k,
                                      samples_per_shard=sw.data.samples_per_shard)
                log.info("[sweep] split f=%g fold %d: %s", f, k, counts)
            exports: Dict[str, str] = {}
            for m in sw.models:
                name = cell_name(f, k, m.name)
                cell_url = storage.join(cells_dir, name + ".json")
                done += 1
                if storage.exists(cell_url):
                    cell = json.loads(storage.get_bytes(cell_url))
                    exports[m.name] = cell["export"]
                    log.info("[sweep] cell %d/%d %s: done before (accuracy %.4f)", done, total, name,
                             cell["metrics"]["accuracy"])
                    continue
                log.info("[sweep] cell %d/%d %s: training (%s)", done, total, name, sw.launcher)
                cfg = _stage_config(sw, m, f, k, split, exports)
                export = run_config(cfg, sw.launcher, label=cfg.run.name).export_path
                metrics = evaluate_shards(export, sw.data.test)
                exports[m.name] = export
                cell = {"fraction": f, "fold": k, "model": m.name, "run": cfg.run.name, "export": export,
                        "metrics": {key: float(metrics[key]) for key in METRICS},
                        "num_samples": int(metrics.get("num_samples", 0))}
                storage.put_bytes(cell_url, json.dumps(cell, sort_keys=True).encode())   # last: the cell is done
                log.info("[sweep] cell %s: accuracy %.4f, mean class accuracy %.4f, macro-F1 %.4f (%.0f s so far)",
                         name, cell["metrics"]["accuracy"], cell["metrics"]["mean_class_accuracy"],
                         cell["metrics"]["macro_f1"], time.time() - t0)
    return summarize(sw)


def _mean_std(xs: List[float]) -> Dict[str, float]:
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0   # sample std over folds
    return {"mean": mean, "std": std, "n": n}


def summarize(sw: SweepCfg) -> Dict[str, Any]:
    """Table of the finished cells: per (model, fraction) mean ± std over folds; Markdown + CSV + JSON."""
    root = storage.join(sw.storage, sw.name)
    cells = []
    for f in sw.fractions:
        for k in range(sw.folds):
            for m in sw.models:
                url = storage.join(root, "cells", cell_name(f, k, m.name) + ".json")
                if storage.exists(url):
                    cells.append(json.loads(storage.get_bytes(url)))
    rows = []
    for m in sw.models:
        for f in sw.fractions:
            got = [c for c in cells if c["model"] == m.name and c["fraction"] == f]
            if got:
                rows.append({"model": m.name, "fraction": f, "folds": len(got),
                             **{key: _mean_std([c["metrics"][key] for c in got]) for key in METRICS}})
    pct = [f"{f * 100:g} %" for f in sw.fractions]
    md = io.StringIO()
    md.write(f"# {sw.name}: test accuracy, mean ± std over {sw.folds} fold(s) (%)\n\n")
    md.write("| model | " + " | ".join(pct) + " |\n|---|" + "---|" * len(pct) + "\n")
    for m in sw.models:
        cols = []
        for f in sw.fractions:
            r = next((r for r in rows if r["model"] == m.name and r["fraction"] == f), None)
            cols.append("–" if r is None else
                        f"{100 * r['accuracy']['mean']:.2f} ± {100 * r['accuracy']['std']:.2f}"
                        + ("" if r["folds"] == sw.folds else f" ({r['folds']}/{sw.folds} folds)"))
        md.write(f"| {m.name} | " + " | ".join(cols) + " |\n")
    md.write("\nMean class accuracy / macro-F1 (mean over folds, %):\n\n| model | fraction | mean class acc. | "
             "macro-F1 |\n|---|---|---|---|\n")
    for r in rows:
        md.write(f"| {r['model']} | {r['fraction'] * 100:g} % | {100 * r['mean_class_accuracy']['mean']:.2f} ± "
                 f"{100 * r['mean_class_accuracy']['std']:.2f} | {100 * r['macro_f1']['mean']:.2f} ± "
                 f"{100 * r['macro_f1']['std']:.2f} |\n")
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["model", "fraction", "folds"] + [f"{key}_{s}" for key in METRICS for s in ("mean", "std")])
    for r in rows:
        w.writerow([r["model"], r["fraction"], r["folds"]] + [f"{r[key][s]:.6f}" for key in METRICS
                                                               for s in ("mean", "std")])
    summary = {"name": sw.name, "cells_done": len(cells),
               "cells_total": len(sw.fractions) * sw.folds * len(sw.models), "rows": rows}
    storage.put_bytes(storage.join(root, "table.md"), md.getvalue().encode())
    storage.put_bytes(storage.join(root, "table.csv"), out.getvalue().encode())
    storage.put_bytes(storage.join(root, "summary.json"), json.dumps(summary, indent=1, sort_keys=True).encode())
    return summary


def sweep_from_cli(path: str, overrides: List[str], table_only: bool = False) -> int:
    import sys


    sw = load_sweep(path, overrides)
    root = storage.join(sw.storage, sw.name)
    with console.log_file(root, "sweep.log"):
        summary = summarize(sw) if table_only else run_sweep(sw)
    sys.stdout.write(storage.get_bytes(storage.join(root, "table.md")).decode())
    log.info("[sweep] %d/%d cells; table: %s (+ table.csv, summary.json)", summary["cells_done"],
             summary["cells_total"], storage.join(root, "table.md"))
    return 0
