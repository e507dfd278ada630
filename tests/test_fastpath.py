"""The GPU fast path switches: resolution per device, and each one exercised on CPU where it can run."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from stepkit import ROOT, TorchEngine, batches, build

from ssfer_dist.config import load_config
from ssfer_dist.distributed.engine import build_optimizer
from ssfer_dist.models.classifier import build_classifier
from ssfer_dist.models.mae import build_mae
from ssfer_dist.train import fastpath
from ssfer_dist.train.step import DeviceMetrics, train_step
from ssfer_dist.typed import ConfigError


def _cfg(*overrides):
    return load_config(str(ROOT / "configs" / "debug_cpu_pretrain.yaml"), list(overrides))


def test_automatic_switches_follow_the_device(monkeypatch):
    cpu = fastpath.resolve(_cfg(), "cpu")
    assert not (cpu.pin_memory or cpu.fused or cpu.tf32 or cpu.compile or cpu.grad_checkpointing)
    assert any(n.startswith("train.compile: auto-off") for n in cpu.notes)
    monkeypatch.setattr(fastpath, "compiler_problem", lambda device: None)
    gpu = fastpath.resolve(_cfg("train.precision=bf16"), "cuda")
    assert gpu.pin_memory and gpu.fused and gpu.tf32 and gpu.compile and gpu.precision == "bf16"
    assert not fastpath.resolve(_cfg("train.zero_stage=3"), "cuda").compile        # ZeRO-3: auto-off
    off = fastpath.resolve(_cfg("optim.fused=false", "train.tf32=false", "train.compile=false",
                                "data.pin_memory=false"), "cuda")
    assert not (off.pin_memory or off.fused or off.tf32 or off.compile)
    on_cpu = fastpath.resolve(_cfg("optim.fused=true", "train.compile=true", "model.grad_checkpointing=true"), "cpu")
    assert on_cpu.fused and on_cpu.compile and on_cpu.grad_checkpointing


def test_the_console_summary_groups_switches_by_why_they_are_off(monkeypatch):
    cpu = fastpath.summary(fastpath.resolve(_cfg(), "cpu"))
    assert cpu.startswith("cpu, fp32; off: ") and "on:" not in cpu
    assert "data.pin_memory, optim.fused" in cpu and "(no CUDA device)" in cpu
    assert "model.grad_checkpointing (config)" in cpu and "#" not in cpu
    monkeypatch.setattr(fastpath, "compiler_problem", lambda device: None)
    gpu = fastpath.summary(fastpath.resolve(_cfg("train.precision=bf16", "train.zero_stage=3"), "cuda"))
    assert gpu.startswith("cuda, bf16; on: data.pin_memory, optim.fused, train.tf32; off: ")
    assert "train.compile (ZeRO-3 partitions parameters)" in gpu


def test_compile_without_a_compiler_is_a_config_error(monkeypatch):
    monkeypatch.setattr(fastpath.shutil, "which", lambda name: None)
    monkeypatch.setattr(fastpath.os.path, "isfile", lambda p: False)
    assert "not found" in fastpath.compiler_problem("cpu")
    with pytest.raises(ConfigError, match=r"^train\.compile: true, but .*set train\.compile: false"):
        fastpath.resolve(_cfg("train.compile=true"), "cpu")
    # a local run checks before any worker starts
    from ssfer_dist.launchers import base

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=r"^train\.compile"):
        base.check_fast_path_local(_cfg("train.compile=true"))
    # automatic: quietly off, with the reason
    monkeypatch.setattr(fastpath, "compiler_problem", lambda device: "triton is not installed")
    fp = fastpath.resolve(_cfg("train.compile=null"), "cuda")
    assert not fp.compile and "train.compile: auto-off (triton is not installed)" in fp.notes


def test_tf32_flags(monkeypatch):
    prec = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        fp = fastpath.FastPath("cuda", False, False, True, False, False, "fp32")
        fastpath.apply_backend_flags(fp)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" == torch.backends.cudnn.conv.fp32_precision
        fastpath.apply_backend_flags(dataclasses.replace(fp, tf32=False))
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = prec


def test_fused_adamw_matches_the_default_kernel():
    torch.manual_seed(0)
    a = build_classifier("micro", 32, 8, num_classes=7, drop_path=0.0)
    b = build_classifier("micro", 32, 8, num_classes=7, drop_path=0.0)
    b.load_state_dict(a.state_dict())
    cfg = _cfg()
    oa = build_optimizer([{"params": list(a.parameters()), "weight_decay": 0.05}], cfg.optim, 1e-3)
    ob = build_optimizer([{"params": list(b.parameters()), "weight_decay": 0.05}], cfg.optim, 1e-3, fused=True)
    assert ob.defaults["fused"] and not oa.defaults.get("fused")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 7, (4,))
    before = {n: p.detach().clone() for n, p in a.named_parameters()}
    for m, o in ((a, oa), (b, ob)):
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=n)
    assert not torch.equal(before["head.weight"], a.head.weight)     # the step did move the weights


def _loss_and_grads(model, fn):
    model.zero_grad()
    torch.manual_seed(5)
    loss = fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["mae", "classifier"])
def test_grad_checkpointing_same_loss_and_gradients(kind):
    torch.manual_seed(0)
    if kind == "mae":
        model = build_mae("micro", 32, 8, decoder_dim=32, decoder_depth=2, decoder_heads=2)
        x = torch.randn(4, 3, 32, 32)

        def fn(m):
            return m(x, 0.75)[0]
    else:                                    # drop path on: checkpointing must replay the same random drops
        model = build_classifier("micro", 32, 8, num_classes=7, drop_path=0.2)
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 7, (4,))

        def fn(m):
            return torch.nn.functional.cross_entropy(m(x), y)
    model.train()
    ref_loss, ref_grads = _loss_and_grads(model, fn)
    calls = []
    import torch.utils.checkpoint as cp
    orig = cp.checkpoint

    def counting(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)
    cp.checkpoint = counting
    try:
        fastpath.apply_to_model(fastpath.FastPath("cpu", False, False, False, False, True, "fp32"), model)
        loss, grads = _loss_and_grads(model, fn)
    finally:
        cp.checkpoint = orig
    assert calls, "no block was checkpointed"
    assert len(calls) == (4 if kind == "mae" else 2)      # micro: 2 encoder blocks (+ 2 decoder blocks)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-6, rtol=1e-5, msg=k)


def test_compile_same_loss_as_eager():
    """torch.compile (inductor, CPU) of a real stage module in place: the loop's step gives the eager loss,
    and parameter names (checkpoints, exports) are unchanged."""
    if fastpath.compiler_problem("cpu"):
        pytest.skip("no C++ compiler")
    results = []
    for compiled in (False, True):
        task, model, opt, cfg, _ = build("mae", ("model.decoder_depth=1",))
        names = [n for n, _ in model.named_parameters()]
        if compiled:
            fastpath.apply_to_model(fastpath.FastPath("cpu", False, False, False, True, False, "fp32"), model)
            assert [n for n, _ in model.named_parameters()] == names and model._compiled_call_impl is not None
        metrics = DeviceMetrics(torch.device("cpu"))
        it = batches(cfg)
        for step in range(2):
            train_step(task, TorchEngine(opt), it, 1, step, torch.device("cpu"), metrics, {})
        results.append((metrics.read()["loss"], {n: p.detach().clone() for n, p in model.named_parameters()}))
    (le, pe), (lc, pc) = results
    assert lc == pytest.approx(le, rel=1e-4, abs=1e-5)
    for k in pe:
        torch.testing.assert_close(pc[k], pe[k], atol=1e-4, rtol=1e-3, msg=k)


def test_dry_run_shows_the_fast_path():
    out = subprocess.run([sys.executable, "-m", "ssfer_dist", "run", str(ROOT / "configs" / "pretrain_vitb.yaml"),
                          "--dry-run", "--set", "model.grad_checkpointing=true"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "# fast path on this machine" in text and "model.grad_checkpointing: on" in text
    assert "precision: bf16" in text
    if not torch.cuda.is_available():
        assert "train.compile: auto-off (no CUDA device)" in text and "scaling.use_gpu: true but" in text


# ------------------------------------------------------------------ bad input: GPUs asked for, none here
def test_use_gpu_without_cuda_fails_before_any_worker(monkeypatch, caplog):
    import ray

    from ssfer_dist.launchers import ray as launch
    from ssfer_dist.errors import UserError

    cfg = _cfg("scaling.use_gpu=true")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^scaling.use_gpu: true, but this machine has no CUDA GPU"):
        launch.check_gpus_local(cfg)
    launch.check_gpus_local(_cfg())                            # CPU runs: nothing to check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"need 2 GPUs, this machine has 1"):
        launch.check_gpus_local(cfg)
    # a Ray this process already started (local): its resources decide, before the pre-flight
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(UserError, match="the Ray cluster has 0 now"):
        launch.check_gpus_local(cfg)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    # run_stage checks before it starts Ray
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(launch, "ensure_ray", lambda cfg: pytest.fail("Ray started"))
    with pytest.raises(UserError, match="scaling.use_gpu"):
        launch.run_stage(cfg, plan=object())
    # a CPU-only head driving a cluster: the cluster's resources decide; autoscaling may still add GPUs
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    launch.check_gpus_local(cfg)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    with caplog.at_level("WARNING"):
        launch.check_gpus_cluster(cfg)
    assert "needs 2 GPUs, the Ray cluster has 0 now" in caplog.text
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    launch.check_gpus_cluster(cfg)
    # an in-process local Ray without GPUs (RAY_ADDRESS unset, or "local"): an error
    monkeypatch.setenv("RAY_ADDRESS", "local")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(UserError, match="the Ray cluster has 0 now"):
        launch.check_gpus_cluster(cfg)


def test_every_gpu_config_trains_in_bf16():
    gpu = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if "pipeline" in path.name or path.name.startswith("sweep"):   # not stage configs
            continue
        cfg = load_config(str(path))
        if cfg.scaling.use_gpu:
            gpu.append(path.name)
            assert cfg.train.precision == "bf16", path.name
            assert cfg.train.tf32 and cfg.optim.fused is None and cfg.data.pin_memory is None, path.name
    assert len(gpu) >= 8
