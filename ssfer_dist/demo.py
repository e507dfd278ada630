"""``ssfer demo``: the README's first command — synthetic data → shards → MAE → FaceMix → semi-supervised
→ evaluation, all through the same code paths as real runs, on a local Ray with 2 workers, offline.

1. ``ssfer_dist.synth`` draws a labeled FER set in RAF-DB's layout (aligned crops whose faces vary in scale
   and position like real ones, ``FER_FACE_FRAC``; train/test)
   and a larger unlabeled face set in VGGFace2's folder-per-identity layout (faces in cluttered frames,
   exact boxes in ``loose_bb_train.csv``).
2. The shard builder (``sharding.build.run_build`` — what ``ssfer-shard build`` runs) shards both;
   ``sharding.split.split_shards`` (``ssfer-shard split``) keeps a small labeled fraction per class and
   turns the rest of the FER train set into the unlabeled remainder.
3. Five training runs through ``ssfer_dist.launchers.run_config`` (what ``ssfer run`` runs: Ray Train
   TorchTrainer + DeepSpeed ZeRO-2 on CPU, 2 gloo workers): MAE pretraining on the unlabeled faces;
   FaceMix fine-tuning of the MAE encoder on the labeled fraction; semi-supervised fine-tuning (EMA
   teacher, fixed threshold) on labeled + unlabeled; a supervised-from-scratch baseline with the
   same recipe and label budget but no pretraining; and plain mixup (FaceMix without its real-image term)
   from the same MAE encoder.
4. ``ssfer_dist.evaluate`` scores each classifier on the synthetic test split and the demo prints a
   comparison table and where the outputs are.

Note on boxes: the labeled faces fill 80-100 % of their aligned frame at varying positions, and the shards
record their exact boxes (``ssfer-shard build --format rafdb --boxes synth_boxes.csv``; on real aligned sets
``--detector`` records detected boxes the same way) while the aligned frame stays the stored image. FaceMix's
IoUs therefore vary and its (1 - IoU)-weighted real-image term takes part; the summary reports the mean IoU
and the real term's share of the FaceMix loss from the run's metrics. The unlabeled set carries exact boxes
too (VGGFace2 layout), which the builder uses for cropping.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any, Dict, Optional

# The demo is an application above both packages: with ssfer_dist/sweep.py the only modules of ssfer_dist
# that import sharding (tests/test_imports.py holds every other module to the one-way rule).
from sharding.build import BuildConfig, run_build
from sharding.split import split_shards
from ssfer_dist import console, synth
from ssfer_dist.config import from_dict
from ssfer_dist.errors import UserError
from ssfer_dist.evaluate import evaluate_shards, write_outputs
from ssfer_dist.launchers import planned_steps, run_config
from ssfer_dist.shards.manifest import read_manifest
from ssfer_dist.stages import check_stage_config

log = logging.getLogger(__name__)

__all__ = ["DemoPlan", "demo_plan", "run_demo", "demo_cli", "format_comparison"]

MARKER = ".ssfer-demo"
ROWS = (("scratch", "supervised from scratch"), ("mixup", "MAE + plain mixup"), ("facemix", "MAE + FaceMix"),
        ("semisup", "+ semi-supervised"))
FER_FACE_FRAC = (0.8, 1.0)     # the labeled faces' larger side as a fraction of the aligned frame


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """Sizes and steps of one demo run (``quick`` for tests, full for the README)."""
    train_per_class: int
    test_per_class: int
    fr_identities: int
    fr_per_identity: int
    label_fraction: float
    mae_steps: int
    finetune_steps: int
    semisup_steps: int
    batch_per_rank: int = 32
    mu: int = 2
    image_size: int = 32
    patch_size: int = 8
    model_size: str = "micro"


def demo_plan(quick: bool) -> DemoPlan:
    """Quick (tests): 2100 train / 280 test FER images, 350 labeled, 2000 FR faces, 600 MAE + 700
    fine-tuning + 400 semi-supervised steps. Full (README): 3500 / 700, 350 labeled, 3000 FR faces,
    1200 + 800 + 600 steps. Global batch 64 (32 per rank x 2 workers), unlabeled batch 2x."""
    if quick:
        return DemoPlan(train_per_class=300, test_per_class=40, fr_identities=100, fr_per_identity=20,
                        label_fraction=1 / 6, mae_steps=600, finetune_steps=700, semisup_steps=400)
    return DemoPlan(train_per_class=500, test_per_class=100, fr_identities=150, fr_per_identity=20,
                    label_fraction=0.1, mae_steps=1200, finetune_steps=800, semisup_steps=600)


# ------------------------------------------------------------------------------------------- data

def _progress(what: str, every_s: float = 5.0):
    """A ``progress(done, total)`` callback logging ``what: done/total (p %)``: at the first image, then
    at each further 20 % (at most every ``every_s``), and at the end."""
    last = [-1, 0.0]                 # last 20 % bucket logged, its time

    def report(done: int, total: int) -> None:
        bucket, now = 5 * done // max(total, 1), time.time()
        if done == 1 or done == total or (bucket > last[0] and now - last[1] >= every_s):
            last[0], last[1] = bucket, now
            log.info("%s: %d/%d images (%d %%)", what, done, total, 100 * done // max(total, 1))

    return report


def make_data(out: str, plan: DemoPlan, seed: int, workers: int = 1) -> Dict[str, str]:
    """Synthetic datasets → shard folders; returns the shard URLs by role."""
    data = os.path.join(out, "data")
    shards = os.path.join(out, "shards")
    raf = os.path.join(data, "rafdb")
    vgg = os.path.join(data, "vggface2")
    t0 = time.time()
    synth.write_rafdb(raf, plan.train_per_class, plan.test_per_class, seed=seed, image_size=64,
                      progress=_progress("synthetic labeled FER set (RAF-DB layout)"), face_frac=FER_FACE_FRAC)
    synth.write_identity_folders(vgg, plan.fr_identities, plan.fr_per_identity, seed=seed, image_size=96,
                                 progress=_progress("synthetic unlabeled face set (VGGFace2 layout)"))
    log.info("synthetic data in %.1fs: %s, %s", time.time() - t0, raf, vgg)
    log.info("building shards (ssfer-shard build) and the labeled split (ssfer-shard split)")
    urls = {"fer_train": os.path.join(shards, "fer_train"), "fer_test": os.path.join(shards, "fer_test"),
            "fr": os.path.join(shards, "fr"), "split": os.path.join(shards, "fer_split")}
    common = dict(image_size=plan.image_size, samples_per_shard=500, workers=workers, seed=seed, progress=False)
    # dataset names start with "synth": exports record them (trained_on) and `ssfer predict` warns
    boxes = os.path.join(raf, "synth_boxes.csv")     # the faces' true boxes, recorded; the aligned frame is kept
    run_build(BuildConfig(format="rafdb", input=raf, output=urls["fer_train"], split="train", name="synthfer",
                          boxes=boxes, **common))
    run_build(BuildConfig(format="rafdb", input=raf, output=urls["fer_test"], split="test", name="synthfer",
                          boxes=boxes, **common))
    # box_scale 1.05: crop the unlabeled faces as tightly as the aligned labeled ones
    run_build(BuildConfig(format="image-folder", input=os.path.join(vgg, "train"), output=urls["fr"],
                          name="synthfr", box_scale=1.05, **common))
    split_shards(urls["fer_train"], urls["split"], fraction=plan.label_fraction, per_class=True, seed=seed,
                 samples_per_shard=500)
    urls["labeled"] = os.path.join(urls["split"], "labeled")
    urls["unlabeled"] = os.path.join(urls["split"], "unlabeled")
    return urls


# ------------------------------------------------------------------------------------------- configs

def stage_configs(plan: DemoPlan, urls: Dict[str, str], runs: str, seed: int, num_workers: int) -> Dict[str, Any]:
    """The five run configs (``ssfer_dist.config.Config``), built in code from the typed tree."""
    b = plan.batch_per_rank
    common = {
        "scaling": {"num_workers": num_workers, "cpus_per_worker": 1},
        "checkpoint": {"every_steps": 0, "num_to_keep": 1},
        "data": {"shards": urls["labeled"], "batch_size_per_rank": b, "num_loader_workers": 1,
                 "shuffle_buffer": 256},
        "model": {"size": plan.model_size, "img_size": plan.image_size, "patch_size": plan.patch_size,
                  "global_pool": "avg", "drop_path": 0.0},
    }

    def cfg(name: str, **sections) -> Any:
        d = json.loads(json.dumps(common))
        d["run"] = {"name": f"demo-s{seed}-{name}", "storage": runs, "seed": seed}
        for k, v in sections.items():
            d[k] = {**d.get(k, {}), **v}
        return check_stage_config(from_dict(d, source=f"demo:{name}"), f"demo:{name}")

    pre = cfg("pretrain",
              model={"mask_ratio": 0.75, "decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 2},
              data={"shards": urls["fr"]},
              optim={"lr": 2.0e-3, "weight_decay": 0.05, "betas": [0.9, 0.95], "warmup_steps": 20, "min_lr": 1.0e-5},
              train={"stage": "mae", "max_steps": plan.mae_steps, "zero_stage": 2, "log_every": 50,
                     "preview_every": max(1, plan.mae_steps // 2)})
    ft_optim = {"lr": 1.0e-3, "weight_decay": 0.05, "betas": [0.9, 0.999], "warmup_steps": 20, "min_lr": 1.0e-5}
    ft_train = {"stage": "facemix", "max_steps": plan.finetune_steps, "zero_stage": 2, "log_every": 50}
    scratch = cfg("scratch", optim=ft_optim, train=ft_train, facemix={"alpha": 1.0, "label_smoothing": 0.1})
    pretrain_export = os.path.join(runs, f"demo-s{seed}-pretrain", "export", "model.safetensors")
    ft = cfg("facemix", optim=ft_optim, train=ft_train, facemix={"alpha": 1.0, "label_smoothing": 0.1},
             init={"weights": pretrain_export})
    mixup = cfg("mixup", optim=ft_optim, train=ft_train,
                facemix={"alpha": 1.0, "label_smoothing": 0.1, "real_term": False}, init={"weights": pretrain_export})
    ft_export = os.path.join(runs, f"demo-s{seed}-facemix", "export", "model.safetensors")
    ssl = cfg("semisup", init={"weights": ft_export},
              data={"unlabeled": [{"shards": urls["unlabeled"], "weight": 0.8}, {"shards": urls["fr"], "weight": 0.2}],
                    "mu": plan.mu},
              optim={"lr": 5.0e-4, "weight_decay": 0.05, "betas": [0.9, 0.999], "warmup_steps": 10, "min_lr": 1.0e-5},
              train={"stage": "semisup", "max_steps": plan.semisup_steps, "zero_stage": 2, "log_every": 50},
              semisup={"lambda_u": 1.0, "ema_decay": 0.99, "threshold": {"kind": "fixed", "tau": 0.7}})
    return {"pretrain": pre, "scratch": scratch, "mixup": mixup, "facemix": ft, "semisup": ssl}


# ------------------------------------------------------------------------------------------- run

def _prepare_out(out: str) -> None:
    if os.path.exists(out) and os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)):
        raise UserError(f"{out}: exists and is not a demo folder (no {MARKER}); choose an empty or new --out")
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, MARKER), "w").close()


def run_demo(out: str, quick: bool = False, seed: int = 0, num_workers: int = 2,
             plan: Optional[DemoPlan] = None, launcher: str = "ray") -> Dict[str, Any]:
    """Run the whole demo for one seed; returns the summary (also written to ``seed<N>/report/summary.json``).
    Every line (ours, Ray's, the workers') goes to ``seed<N>/logs/demo.log``; the console shows ours."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ssfer-torch-extensions"))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    plan = plan or demo_plan(quick)
    out = os.path.abspath(out)
    _prepare_out(out)
    t_start = time.time()
    seed_dir = os.path.join(out, f"seed{seed}")
    for sub in ("data", "shards", "runs", "report", "logs", "configs"):
        shutil.rmtree(os.path.join(seed_dir, sub), ignore_errors=True)  # a rerun starts clean
    with console.log_file(seed_dir, "demo.log") as log_path:
        log.info("ssfer demo (seed %d%s): full log %s", seed, ", quick" if quick else "", log_path)
        return _run_demo(out, seed_dir, quick, seed, num_workers, plan, t_start, log_path, launcher)


def _run_demo(out: str, seed_dir: str, quick: bool, seed: int, num_workers: int, plan: DemoPlan,
              t_start: float, log_path: str, launcher: str = "ray") -> Dict[str, Any]:

    names = ("pretrain", "scratch", "mixup", "facemix", "semisup")
    count = len(names) + 2                   # data, five trainings, evaluation
    with console.stage(1, count, "synthetic data and shards"):
        urls = make_data(seed_dir, plan, seed)

    t_data = time.time() - t_start
    runs = os.path.join(seed_dir, "runs")
    cfgs = stage_configs(plan, urls, runs, seed, num_workers)
    steps = [planned_steps(cfgs[n]) for n in names]
    timings: Dict[str, float] = {"data": round(t_data, 1)}
    results: Dict[str, Any] = {}
    for i, name in enumerate(names):
        t = time.time()
        with console.stage(i + 2, count, name, future_steps=steps[i + 1:]):
            # torchrun: the demo's configs are kept as seed<N>/configs/<name>.yaml
            results[name] = run_config(cfgs[name], launcher, label=name,
                                       config_dir=os.path.join(seed_dir, "configs"), file_stem=name)
        timings[name] = round(time.time() - t, 1)
    report = os.path.join(seed_dir, "report")
    rows: Dict[str, Any] = {}
    t = time.time()
    with console.stage(count, count, "evaluate on the test split"):
        for key, label in ROWS:
            m = evaluate_shards(results[key].export_path, urls["fer_test"])
            paths = write_outputs(m, os.path.join(report, key), title=f"{label} (seed {seed})")
            rows[key] = {"label": label, "accuracy": m["accuracy"], "mean_class_accuracy": m["mean_class_accuracy"],
                         "macro_f1": m["macro_f1"], "weights": results[key].export_path,
                         "confusion_png": paths["confusion_png"], "metrics": paths["metrics"]}
            log.info("%s: accuracy %.3f", label, m["accuracy"])
    timings["evaluate"] = round(time.time() - t, 1)
    timings["total"] = round(time.time() - t_start, 1)

    summary = {
        "facemix_terms": facemix_terms(results["facemix"].run_url),
        "seed": seed, "quick": quick, "launcher": launcher, "plan": dataclasses.asdict(plan), "rows": rows,
        "timings_s": timings,
        "num_labeled": read_manifest(urls["labeled"], with_index=False).num_samples,
        "num_unlabeled_fer": read_manifest(urls["unlabeled"], with_index=False).num_samples,
        "num_unlabeled_fr": read_manifest(urls["fr"], with_index=False).num_samples,
        "num_test": read_manifest(urls["fer_test"], with_index=False).num_samples,
        "chance": 1.0 / 7,
        "outputs": {"runs": runs, "report": report, "shards": os.path.join(seed_dir, "shards"),
                    "previews": os.path.join(runs, f"demo-s{seed}-pretrain", "previews"),
                    "tensorboard": f"tensorboard --logdir {runs}", "log": log_path},
    }
    with open(os.path.join(report, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary


def facemix_terms(run_url: str) -> Dict[str, float]:
    """Mean FaceMix IoU and the real-image term's share of the loss over a FaceMix run's metric lines."""
    lines = [json.loads(x) for x in open(os.path.join(run_url, "metrics.jsonl")) if x.strip()]
    lines = [r for r in lines if "iou" in r and "real_share" in r]
    n = max(1, len(lines))
    return {"mean_iou": sum(r["iou"] for r in lines) / n, "real_share": sum(r["real_share"] for r in lines) / n,
            "loss_real": sum(r["loss_real"] for r in lines) / n, "num_lines": len(lines)}


def format_comparison(summary: Dict[str, Any]) -> str:
    """The comparison table and the output locations, as the demo prints them."""
    s = summary
    lines = [f"ssfer demo (seed {s['seed']}{', quick' if s['quick'] else ''}): {s['num_labeled']} labeled, "
             f"{s['num_unlabeled_fer']} unlabeled FER + {s['num_unlabeled_fr']} unlabeled FR faces, "
             f"{s['num_test']} test images, 7 classes (chance {s['chance']:.3f})", "",
             f"{'model':<26} {'accuracy':>8} {'mean class acc':>14} {'macro-F1':>8}"]
    for key, label in ROWS:
        r = s["rows"][key]
        lines.append(f"{label:<26} {r['accuracy']:>8.3f} {r['mean_class_accuracy']:>14.3f} {r['macro_f1']:>8.3f}")
    t = s.get("facemix_terms")
    if t:
        lines += ["", f"FaceMix: mean IoU of the mixed faces {t['mean_iou']:.3f}; the (1 - IoU)-weighted real-image "
                      f"term is {100 * t['real_share']:.1f} % of its loss (mean over {t['num_lines']} log lines)"]
    o = s["outputs"]
    lines += ["", "outputs:",
              f"  weights             {o['runs']}/<run>/export/model.safetensors",
              f"  confusion matrices  {o['report']}/<model>/confusion.png (+ confusion.json, metrics.json)",
              f"  MAE reconstructions {o['previews']}/",
              f"  TensorBoard         {o['tensorboard']}",
              f"  shards              {o['shards']}/",
              f"  full log            {o.get('log', '-')}",
              "timings (s): " + ", ".join(f"{k} {v}" for k, v in s["timings_s"].items())]
    return "\n".join(lines)


def demo_cli(out: str = "ssfer-demo", quick: bool = False, seed: int = 0, num_workers: int = 2,
             launcher: str = "ray") -> int:
    """``ssfer demo``: run and print the comparison table."""
    summary = run_demo(out, quick=quick, seed=seed, num_workers=num_workers, launcher=launcher)
    print(format_comparison(summary))
    return 0
