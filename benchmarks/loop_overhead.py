"""The price of the training loop: its steady-state img/s against a bare torch loop, same model, same batches.

- **bare**: ``build_mae`` + ``torch.optim.AdamW``; forward, backward, step on in-memory uint8 batches
  normalised like the tasks do. No DeepSpeed, no metrics, no launcher.
- **torchrun** / **ray**: ``ssfer run`` (1 worker) on the debug MAE config scaled to ``--size/--img/--batch``,
  with ``data.replay_batches`` (the first 4 micro-batches cycled from memory: the loader is out of the
  measurement) and ``data.augment_on: cpu`` (no on-device crops: the bare loop has none). Its img/s is
  the median of the ``images_per_s`` the loop logs every ``--log-every`` steps, the first and last windows
  left out (warm-up; the final checkpoint and export).

Each round runs bare, then every launcher; ``--repeats`` rounds give min / median per ratio. Target:
loop ≥ 0.9× bare. Prints one JSON summary last and records the figures in benchmarks/results/.

    OMP_NUM_THREADS=2 python benchmarks/loop_overhead.py --repeats 3
    OMP_NUM_THREADS=2 python benchmarks/loop_overhead.py --launchers torchrun --size micro --img 32 --steps 40
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import results  # noqa: E402  (benchmarks/results.py: this folder is sys.path[0] for a script)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from ssfer_dist.models.mae import build_mae  # noqa: E402
from ssfer_dist.tasks.common import prepare_images  # noqa: E402

DECODER = dict(decoder_dim=128, decoder_depth=2, decoder_heads=4)


def bare(size: str, img: int, patch: int, batch: int, steps: int, threads: int, warmup: int = 5) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_mae(size, img, patch, False, DECODER["decoder_dim"], DECODER["decoder_depth"],
                      DECODER["decoder_heads"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (batch, 3, img, img), dtype=torch.uint8, generator=g) for _ in range(4)]
    model.train()
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        loss, _, _ = model(prepare_images(batches[i % 4]), mask_ratio=0.75)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def make_shards(folder: str, img: int, n: int) -> str:
    from ssfer_dist.train.debugdata import face_images, write_shard_folder

    return write_shard_folder(os.path.join(folder, "fr"), face_images(n, img), [-1] * n, dataset="fr",
                              num_classes=0, samples_per_shard=64)


def loop(launcher: str, shards: str, runs: str, name: str, a) -> float:
    cfg = os.path.join(ROOT, "configs", "debug_cpu_pretrain.yaml")
    sets = [f"data.shards={shards}", f"run.storage={runs}", f"run.name={name}", "scaling.num_workers=1",
            f"scaling.cpus_per_worker={a.threads}", f"model.size={a.size}", f"model.img_size={a.img}",
            f"model.patch_size={a.patch}", f"model.decoder_dim={DECODER['decoder_dim']}",
            f"model.decoder_depth={DECODER['decoder_depth']}", f"model.decoder_heads={DECODER['decoder_heads']}",
            f"data.batch_size_per_rank={a.batch}", "data.replay_batches=4", "data.augment_on=cpu",
            "data.num_loader_workers=1", f"train.max_steps={a.steps}", f"train.log_every={a.log_every}",
            "checkpoint.every_steps=0", "train.preview_every=0", f"train.zero_stage={a.zero}", "train.grad_clip=1.0",
            "failure.max_failures=0"]
    cmd = [sys.executable, "-m", "ssfer_dist.cli", "run", cfg, "--launcher", launcher]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{launcher} run failed ({p.returncode}):\n{p.stderr[-4000:]}")
    with open(os.path.join(runs, name, "metrics.jsonl")) as f:
        recs = [json.loads(x) for x in f if x.strip()]
    ips = [r["images_per_s"] for r in recs[1:-1]] or [r["images_per_s"] for r in recs]
    return statistics.median(ips)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launchers", default="torchrun,ray")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--img", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--zero", type=int, default=2, help="train.zero_stage of the loop runs")
    a = ap.parse_args()
    launchers = [x for x in a.launchers.split(",") if x]
    rows = {"bare": []}
    rows.update({x: [] for x in launchers})
    with tempfile.TemporaryDirectory(prefix="ssfer-loopbench-") as tmp:
        shards = make_shards(tmp, a.img, a.batch * 8)
        for r in range(a.repeats):
            rows["bare"].append(bare(a.size, a.img, a.patch, a.batch, a.steps, a.threads))
            print(f"round {r + 1}: bare {rows['bare'][-1]:.1f} img/s", flush=True)
            for x in launchers:
                rows[x].append(loop(x, shards, os.path.join(tmp, "runs"), f"{x}-{r}", a))
                print(f"round {r + 1}: {x} {rows[x][-1]:.1f} img/s "
                      f"({rows[x][-1] / rows['bare'][-1]:.2f}x bare)", flush=True)
    summary = {"config": {"size": a.size, "img": a.img, "patch": a.patch, "batch": a.batch, "steps": a.steps,
                          "log_every": a.log_every, "threads": a.threads, "repeats": a.repeats, "zero_stage": a.zero,
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
               "img_per_s": rows, "target_ratio": 0.9}
    for x in launchers:
        ratios = [v / b for v, b in zip(rows[x], rows["bare"])]
        summary[f"{x}_vs_bare"] = {"min": min(ratios), "median": statistics.median(ratios), "all": ratios}
    print(json.dumps(summary, sort_keys=True))
    results.record("loop_overhead", results.command_line(), rows, unit="img/s", baseline="bare",
                   note=f"ViT-{a.size} MAE, {a.img} px, batch {a.batch}, {a.steps} steps, ZeRO-{a.zero}, "
                        f"{a.threads} torch threads; rounds interleaved; target loop ≥ 0.9× bare",
                   extra={k: v for k, v in summary.items() if k.endswith("_vs_bare")})


if __name__ == "__main__":
    main()
