"""No host sync in the step: the loop's step body reads nothing from the device outside log steps.

Every stage's real task (built by its Stage object; all four threshold policies) runs through
``ssfer_dist.train.step.train_step`` with its optimizer; a counting wrapper on the Tensor methods that
read device values to the host records every call made by ``ssfer_dist`` code. On CUDA the same sequence
also runs under ``torch.cuda.set_sync_debug_mode("error")``.
"""
from __future__ import annotations

import math

import pytest
import torch
from stepkit import CASES, HostReads, TorchEngine, batches, build, case_id

from ssfer_dist.train.step import DeviceMetrics, train_step

LOG_EVERY, STEPS = 3, 6


def _run(case, device, monkeypatch=None, sync_debug=False):
    stage, ov = case
    task, _model, opt, cfg, _plan = build(stage, ov, device)
    engine, metrics, corrupt = TorchEngine(opt), DeviceMetrics(device), {}
    kit = HostReads().install(monkeypatch) if monkeypatch is not None else None
    src = batches(cfg)

    def feed():
        for b in src:
            if kit is not None:
                kit.allowed.add(id(b["__corrupt__"]))   # the loader's CPU counter: read on the host, no sync
            yield b
    it = feed()
    logs = []
    for step in range(STEPS):
        if kit is not None:
            kit.on = True
        if sync_debug:
            torch.cuda.set_sync_debug_mode("error")
        try:
            train_step(task, engine, it, 1, step, device, metrics, corrupt)
        finally:
            if sync_debug:
                torch.cuda.set_sync_debug_mode("default")
            if kit is not None:
                kit.on = False
        if (step + 1) % LOG_EVERY == 0:
            logs.append(metrics.read())                  # the log step: the one host read
    return kit, logs, corrupt


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_no_host_reads_outside_log_steps(case, monkeypatch):
    kit, logs, corrupt = _run(case, torch.device("cpu"), monkeypatch)
    assert kit.calls == [], kit.calls
    assert len(logs) == STEPS // LOG_EVERY
    for rec in logs:
        assert math.isfinite(rec["loss"]) and rec["loss"] > 0
    assert corrupt == {0: (STEPS - 1) % 3}
    if case[0] == "semisup":
        assert {"loss_x", "loss_u", "mask_rate", "tau_mean", "pseudo_acc"} <= set(logs[0])


def test_the_counter_catches_a_host_read(monkeypatch):
    """The check can fail: a read made by ssfer_dist code while counting (here the log-step read itself) is
    recorded with its place; torch's own calls are not."""
    kit = HostReads().install(monkeypatch)
    m = DeviceMetrics(torch.device("cpu"))
    m.add({"loss": torch.tensor(1.0)})
    kit.on = True
    torch.tensor([1.0, 2.0]).tolist()            # this test's own call: not ssfer_dist's
    m.read()
    kit.on = False
    assert len(kit.calls) == 1 and kit.calls[0].startswith("tolist at ssfer_dist.train.step:"), kit.calls


def test_device_metrics_window_means_and_nan_is_undefined():
    m = DeviceMetrics(torch.device("cpu"))
    m.add({"loss": torch.tensor(2.0), "acc": torch.tensor(float("nan")), "lam": 0.5})
    m.add({"loss": torch.tensor(4.0), "acc": torch.tensor(1.0), "extra": torch.tensor([1.0, 3.0]), "lam": 1.5})
    out = m.read()
    assert out == {"loss": 3.0, "acc": 1.0, "extra": 2.0, "lam": 1.0}
    m.add({"loss": torch.tensor(1.0), "acc": torch.tensor(float("nan"))})
    assert m.read() == {"loss": 1.0}                     # a new window; acc never defined in it: left out
    # a sum all-reduce over 2 "ranks" (the other rank saw loss 3 and a defined acc 0; keys: loss, acc, extra)
    m.add({"loss": torch.tensor(1.0), "acc": torch.tensor(float("nan"))})
    other = torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    assert m.read(lambda t: t + other) == {"loss": 2.0, "acc": 0.0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sync debug mode)")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_no_cuda_sync_in_the_step(case):
    _kit, logs, _ = _run(case, torch.device("cuda", 0), sync_debug=True)
    assert logs and all(math.isfinite(r["loss"]) for r in logs)
