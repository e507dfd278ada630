"""One prepared check for a CUDA machine; prints one JSON summary and records it in benchmarks/results/gpu.json.

1. **peak**: the GPU's bf16 matmul throughput (an 8192³ product), measured in this run — the MFU baseline.
2. **step**: MAE ViT-B/16 bf16 train step (forward + backward + fused AdamW) at 224 and 112 px, batch 256,
   eager and ``torch.compile``d: img/s, and MFU against that peak (FLOPs of one step from
   ``torch.utils.flop_counter``).
3. **loop**: the real loop under torchrun on 1 GPU — MAE, FaceMix and semi-supervised stages of
   ``configs/gpu_smoke_*.yaml`` on shards made on the spot: each loss falls, each export is written;
   the semi-supervised stage is failed on purpose half-way and rerun, and must resume from its checkpoint;
   the classifier stages evaluate on a held-out split while training and export their best step;
   the MAE stage's img/s ÷ the bare 112-px step's img/s (same model, batch, compile setting).

Targets (benchmarks, not tests): MAE ViT-B/16 bf16 at 224 px ≥ 40 % MFU; loop ≥ 0.9× the bare step.

``--cpu-smoke`` runs the same script tiny on the CPU (micro ViT, 32 px, fp32, no compile) — CI runs that
(tests/test_gpu_check.py). Exit status 1 when a check of part 3 fails.

On a machine without deepspeed/webdataset (the GPU check machine): ``bash benchmarks/make_wheels.sh`` here,
carry ``.whl``, and there::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 benchmarks/gpu.py --out gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List
import results  # noqa: E402  (benchmarks/results.py: this folder is sys.path[0] for a script)

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

STAGES = ("pretrain", "finetune", "semisup")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int, iters: int) -> float:
    """Sustained FLOP/s of an n³ product (bf16 on CUDA, fp32 on the CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def mae_step(device: torch.device, size: str, img: int, patch: int, batch: int, steps: int, compiled: bool,
             dec: Dict[str, int]) -> Dict[str, Any]:
    """img/s and FLOPs per step of the bare MAE train step (autocast bf16 on CUDA, fused AdamW)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ssfer_dist.models.mae import build_mae
    from ssfer_dist.tasks.common import prepare_images

    torch.manual_seed(0)
    model = build_mae(size, img, patch, False, dec["decoder_dim"], dec["decoder_depth"], dec["decoder_heads"])
    model = model.to(device).train()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=cuda)
    fwd = torch.compile(model) if compiled else model
    x = torch.randint(0, 256, (batch, 3, img, img), dtype=torch.uint8, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _, _ = fwd(prepare_images(x), mask_ratio=0.75)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as fc:      # eager: the counter sees every op
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _, _ = model(prepare_images(x), mask_ratio=0.75)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    flops = float(fc.get_total_flops())
    t_c = time.perf_counter()
    for _ in range(3):                               # warm-up (and compilation)
        step()
    _sync(device)
    warm_s = time.perf_counter() - t_c
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    out = {"img": img, "batch": batch, "compiled": compiled, "img_per_s": batch / dt, "step_ms": dt * 1e3,
           "flops_per_step": flops, "achieved_tflops": flops / dt / 1e12, "warmup_s": warm_s}
    if cuda:
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def _metrics(run_dir: str) -> List[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def _run(config: str, sets: List[str], env: Dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ssfer_dist.cli", "run", config, "--launcher", "torchrun"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _fault_env(step: int, marker: str) -> Dict[str, str]:
    """The test suite's fault injector (tests/hooks, a sitecustomize every rank runs) armed for one error on
    rank 0 at ``step``: the benchmark fails a run the way the tests do, with no hook in the product."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from faultinject import HOOKS, fault_env

    path = os.pathsep.join([HOOKS] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return dict(fault_env(step, 0, "error", marker), PYTHONPATH=os.pathsep.join([ROOT, path]))


def real_loop(work: str, smoke: bool, timeout: float) -> Dict[str, Any]:
    """MAE → FaceMix → semi-supervised under torchrun on 1 device, on shards made here."""
    from ssfer_dist.train.debugdata import write_debug_shards

    t0 = time.perf_counter()
    img = 32 if smoke else 128
    shards = write_debug_shards(os.path.join(work, "shards"), image_size=img,
                                num_fr=256 if smoke else 4096, num_fer=224 if smoke else 2048,
                                num_test=70)
    out: Dict[str, Any] = {"shards_s": time.perf_counter() - t0, "stages": {}, "ok": True}
    runs = os.path.join(work, "runs")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("RAY_ADDRESS", None)
    tiny = ["scaling.use_gpu=false", "scaling.cpus_per_worker=2", "model.size=micro", "model.img_size=32",
            "model.patch_size=8", "train.precision=fp32", "train.compile=false", "data.num_loader_workers=1",
            "data.shuffle_buffer=64"] if smoke else []
    per_stage = {
        "pretrain": [f"data.shards={shards['fr']}"] + (["model.decoder_dim=32", "model.decoder_depth=1",
                                                        "model.decoder_heads=2", "data.batch_size_per_rank=16",
                                                        "train.max_steps=20", "checkpoint.every_steps=10"]
                                                       if smoke else []),
        "finetune": [f"data.shards={shards['labeled']}", f"eval.shards={shards['test']}",
                     f"init.weights={os.path.join(runs, 'gpu-smoke-pretrain', 'export', 'model.safetensors')}"]
        + (["data.batch_size_per_rank=8", "train.max_steps=16", "checkpoint.every_steps=8"] if smoke else []),
        "semisup": [f"data.shards={shards['labeled']}", f"eval.shards={shards['test']}",
                    f"init.weights={os.path.join(runs, 'gpu-smoke-finetune', 'export', 'model.safetensors')}",
                    f"data.unlabeled=[{{shards: {shards['unlabeled']}, weight: 0.7}}, "
                    f"{{shards: {shards['fr']}, weight: 0.3}}]"]
        + (["data.batch_size_per_rank=8", "train.max_steps=12", "checkpoint.every_steps=5"] if smoke else []),
    }
    for name in STAGES:
        cfg = os.path.join(ROOT, "configs", f"gpu_smoke_{name}.yaml")
        run_name = f"gpu-smoke-{name}"
        sets = [f"run.storage={runs}", f"run.name={run_name}"] + tiny + per_stage[name]
        st: Dict[str, Any] = {}
        t1 = time.perf_counter()
        if name == "semisup":                     # fail half-way (after a checkpoint), then rerun: it resumes
            every = 5 if smoke else 10
            marker = os.path.join(work, "fault.marker")
            fail_env = dict(env, **_fault_env(every + 2, marker))
            p = _run(cfg, sets, fail_env, timeout)
            st["injected_failure_exit"] = p.returncode
            st["failed_as_planned"] = p.returncode == 1 and "injected fault" in p.stderr
            p = _run(cfg, sets, fail_env, timeout)
            log_path = os.path.join(runs, run_name, "logs", "ssfer.log")
            log_text = open(log_path).read() if os.path.exists(log_path) else ""
            st["resumed"] = f"resumed at step {every}" in (p.stderr + p.stdout + log_text)
        else:
            p = _run(cfg, sets, env, timeout)
        st["wall_s"] = time.perf_counter() - t1
        st["exit"] = p.returncode
        if p.returncode != 0:
            st["stderr_tail"] = p.stderr[-2000:]
        recs = _metrics(os.path.join(runs, run_name))
        if recs:
            st["steps"] = recs[-1]["step"]
            st["loss_first"], st["loss_last"] = recs[0].get("loss"), recs[-1].get("loss")
            st["loss_falls"] = bool(st["loss_first"] is not None and st["loss_last"] < st["loss_first"])
            ips = [r["images_per_s"] for r in recs[1:-1]] or [r["images_per_s"] for r in recs]
            st["img_per_s_median"] = statistics.median(ips)
            evals = [r for r in recs if "eval_accuracy" in r]
            if evals:                            # evaluation while training (classifier stages)
                st["eval_accuracy_last"] = evals[-1]["eval_accuracy"]
                st["eval_macro_f1_last"] = evals[-1]["eval_macro_f1"]
        st["export"] = os.path.exists(os.path.join(runs, run_name, "export", "model.safetensors"))
        checks = [st["exit"] == 0, st.get("loss_falls", False), st["export"]]
        if name != "pretrain":
            st["export_best"] = os.path.exists(os.path.join(runs, run_name, "export", "best", "model.safetensors"))
            checks += [st["export_best"], "eval_accuracy_last" in st]
        if name == "semisup":
            checks += [st["failed_as_planned"], st["resumed"]]
        st["ok"] = all(checks)
        out["ok"] = out["ok"] and st["ok"]
        out["stages"][name] = st
        print(f"loop {name}: {json.dumps(st)[:600]}", flush=True)
    return out


def record_gpu(summary: Dict[str, Any], argv: List[str] | None) -> None:
    rows = {f"MAE ViT-B/16 bf16 step, {r['img']} px, {'compiled' if r['compiled'] else 'eager'}":
            {"min": r["img_per_s"], "median": r["img_per_s"], "mfu": r.get("mfu")} for r in summary["step"]}
    stages = summary.get("loop", {}).get("stages", {})
    if stages.get("pretrain", {}).get("img_per_s_median"):
        ips = stages["pretrain"]["img_per_s_median"]
        rows["the loop under torchrun, MAE stage"] = {"min": ips, "median": ips}
    if rows:
        results.record("gpu", results.command_line(argv), rows, unit="img/s", gpu=summary["device"],
                       note="targets: ≥ 40 % MFU at 224 px bf16; loop ≥ 0.9× the bare step",
                       extra={k: summary.get(k) for k in ("matmul_peak_tflops", "loop_vs_bare", "torch", "wall_s")})


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny, on the CPU (CI)")
    ap.add_argument("--out", default=None, help="also write the JSON summary here")
    ap.add_argument("--work", default=None, help="folder for shards and runs (default: a temporary one)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: peak,step,compiled,loop")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per torchrun stage")
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu.py: no CUDA device; use --cpu-smoke for the CPU variant", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if smoke else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    summary: Dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "cpu_smoke": smoke, "targets": {
                                   "mfu_224_bf16": 0.40, "loop_vs_bare": 0.9}}
    t_all = time.perf_counter()
    if "peak" not in skip:
        summary["matmul_peak_tflops"] = matmul_peak(device, 512 if smoke else 8192, 5 if smoke else 50) / 1e12
        print(f"peak: {summary['matmul_peak_tflops']:.1f} TFLOP/s", flush=True)
    peak = summary.get("matmul_peak_tflops")
    dec = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2} if smoke else \
        {"decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16}
    size, patch = ("micro", 8) if smoke else ("base", 16)
    batch, steps = (16, 3) if smoke else (256, 20)      # the MAE smoke stage's batch
    summary["step"] = []
    if "step" not in skip:
        modes = [False] if (smoke or "compiled" in skip) else [False, True]
        for img in ((32,) if smoke else (224, 112)):
            for compiled in modes:
                r = mae_step(device, size, img, patch, batch, steps, compiled, dec)
                if device.type == "cuda":
                    torch.cuda.empty_cache()      # the step's model and optimizer are gone with it
                if peak:
                    r["mfu"] = r["achieved_tflops"] / peak
                summary["step"].append(r)
                print(f"step: {json.dumps(r)}", flush=True)
    if "loop" not in skip:
        work = a.work or tempfile.mkdtemp(prefix="ssfer-gpu-check-")
        try:
            loop = real_loop(work, smoke, a.timeout)
        finally:
            if a.work is None:
                shutil.rmtree(work, ignore_errors=True)
        summary["loop"] = loop
        mae_ips = loop["stages"].get("pretrain", {}).get("img_per_s_median")
        # the bare step at the smoke stage's shape (112 px; compiled when the loop compiles: the GPU default)
        ref = [r for r in summary["step"] if r["img"] == (32 if smoke else 112)]
        ref = [r for r in ref if r["compiled"]] or ref
        if mae_ips and ref:
            summary["loop_vs_bare"] = mae_ips / ref[0]["img_per_s"]
    summary["wall_s"] = time.perf_counter() - t_all
    text = json.dumps(summary, sort_keys=True)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    if not smoke:      # the CPU smoke run proves the script; its figures are no measurement
        record_gpu(summary, argv)
    return 0 if summary.get("loop", {}).get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
