"""``ssfer sweep``: 2 label fractions × 2 folds × {FaceMix, semi-supervised from it} on the debug shards,
under torchrun (real DeepSpeed, 1 CPU rank per run): per-class seeded splits, one run per cell, evaluation on
the test split, a mean ± std table; a rerun trains nothing."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from ssfer_dist.config import ConfigError
from ssfer_dist.shards.manifest import read_manifest
from ssfer_dist.sweep import load_sweep
from ssfer_dist.train.debugdata import write_debug_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

SMALL = ["init.weights=null", "scaling.num_workers=1", "data.batch_size_per_rank=4", "train.log_every=2",
         "checkpoint.every_steps=0", "train.preview_every=0"]


def _write(tmp_path, shards, **extra):
    spec = {"name": "tiny", "storage": str(tmp_path / "sweeps"),
            "data": {"labeled": shards["labeled"], "test": shards["test"], "samples_per_shard": 16},
            "fractions": [0.3, 0.6], "folds": 2, "seed": 0, "launcher": "torchrun",
            "models": [
                {"name": "facemix", "config": os.path.join(CONFIGS, "debug_cpu_finetune.yaml"),
                 "overrides": SMALL + ["train.max_steps=6"]},
                {"name": "semisup", "config": os.path.join(CONFIGS, "debug_cpu_semisup.yaml"), "init_from": "facemix",
                 "overrides": SMALL + ["train.max_steps=4", "data.mu=1",
                                       f"data.unlabeled=[{{shards: '{shards['fr']}', weight: 0.3}}]"]}]}
    spec.update(extra)
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(spec))
    return str(p)


def _ssfer(args):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "ssfer_dist.cli"] + args, capture_output=True, text=True,
                          timeout=800, env=env, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_runs_every_cell_once_and_tabulates(tmp_path):
    shards = write_debug_shards(str(tmp_path / "shards"))
    path = _write(tmp_path, shards)
    p = _ssfer(["sweep", path])
    assert p.returncode == 0, p.stderr[-4000:]
    root = tmp_path / "sweeps" / "tiny"
    cells = sorted(os.listdir(root / "cells"))
    assert cells == sorted(f"f{f}-k{k}-{m}.json" for f in ("30", "60") for k in (0, 1)
                           for m in ("facemix", "semisup")), cells
    full = read_manifest(shards["labeled"]).num_samples
    sizes = {}
    for f in ("30", "60"):
        for k in (0, 1):
            split = root / "splits" / f"f{f}-k{k}"
            lab = read_manifest(str(split / "labeled")).num_samples
            unl = read_manifest(str(split / "unlabeled")).num_samples
            assert lab + unl == full
            sizes[(f, k)] = lab
    assert sizes[("30", 0)] < sizes[("60", 0)]
    keys = {k: read_manifest(str(root / "splits" / f"f30-k{k}" / "labeled")).index().column("key").to_pylist()
            for k in (0, 1)}
    assert keys[0] != keys[1]                                   # folds are different seeded splits
    for name in cells:
        cell = json.loads((root / "cells" / name).read_text())
        assert 0.0 <= cell["metrics"]["accuracy"] <= 1.0 and cell["num_samples"] == 70
        assert os.path.exists(cell["export"])
    semi = json.loads((root / "cells" / "f30-k0-semisup.json").read_text())
    meta_init = (root / "runs" / "tiny-f30-k0-semisup" / "logs" / "ssfer.log").read_text()
    assert "tiny-f30-k0-semisup" in semi["run"] and "run tiny-f30-k0-semisup" in meta_init
    with open(root / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["fraction"], r["folds"]) for r in rows] == [
        ("facemix", "0.3", "2"), ("facemix", "0.6", "2"), ("semisup", "0.3", "2"), ("semisup", "0.6", "2")]
    accs = {(c["model"], c["fraction"]): [] for c in map(lambda n: json.loads((root / "cells" / n).read_text()),
                                                         cells)}
    for n in cells:
        c = json.loads((root / "cells" / n).read_text())
        accs[(c["model"], c["fraction"])].append(c["metrics"]["accuracy"])
    for r in rows:                                              # the table is the cells' mean over folds
        xs = accs[(r["model"], float(r["fraction"]))]
        assert abs(float(r["accuracy_mean"]) - sum(xs) / 2) < 1e-6
    md = (root / "table.md").read_text()
    assert "| facemix |" in md and "| semisup |" in md and "30 %" in md and "±" in md
    assert md.splitlines()[0] in p.stdout

    # resumable: nothing is trained again
    before = {n: (root / "cells" / n).stat().st_mtime for n in cells}
    t0 = time.time()
    again = _ssfer(["sweep", path])
    assert again.returncode == 0, again.stderr[-3000:]
    assert {n: (root / "cells" / n).stat().st_mtime for n in cells} == before
    assert "done before" in (root / "logs" / "sweep.log").read_text()
    assert time.time() - t0 < 120


def test_sweep_file_errors_name_the_key(tmp_path):
    shards = {"labeled": str(tmp_path / "l"), "test": str(tmp_path / "t"), "fr": str(tmp_path / "f")}
    with pytest.raises(ConfigError, match=r"fractions\[1\]: expected a fraction in \(0, 1\), got 1.5"):
        load_sweep(_write(tmp_path, shards, fractions=[0.1, 1.5]))
    with pytest.raises(ConfigError, match=r"models\[0\].init_from: expected the name of a model listed before"):
        load_sweep(_write(tmp_path, shards, models=[{"name": "a", "config": "x.yaml", "init_from": "b"}]))
    with pytest.raises(ConfigError, match="folds: expected int"):
        load_sweep(_write(tmp_path, shards, folds="three"))
