"""Test kit: a real stage task (built by its Stage object from the debug configs) stepped by the loop's own
step body (``ssfer_dist.train.step.train_step``) on in-memory batches shaped like the loader's."""
from __future__ import annotations

import pathlib
import sys
from typing import Dict, Iterator, List, Tuple

import torch

from ssfer_dist.config import load_config
from ssfer_dist.distributed.engine import build_optimizer
from ssfer_dist.stages import get_stage
from ssfer_dist.stages.base import StageConfigs
from ssfer_dist.plan import LaunchPlan, UnlabeledPlan

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = {"mae": "debug_cpu_pretrain.yaml", "facemix": "debug_cpu_finetune.yaml", "semisup": "debug_cpu_semisup.yaml"}
C, N_UNL = 7, 64

# (stage, overrides): every task and every threshold policy
CASES: List[Tuple[str, Tuple[str, ...]]] = [
    ("mae", ()),
    ("facemix", ()),
    ("facemix", ("facemix.enabled=false",)),
    ("facemix", ("train.model_ema=true",)),
    ("facemix", ("facemix.real_term=false",)),
    ("semisup", ("semisup.threshold.kind=fixed",)),
    ("semisup", ("semisup.threshold.kind=dtm", "semisup.threshold.dtm_every=2")),
    ("semisup", ("semisup.threshold.kind=freematch",)),
    ("semisup", ("semisup.threshold.kind=flexmatch",)),
]


def case_id(case) -> str:
    """``semisup-dtm-2``, ``facemix-model_ema``, ``facemix-enabled_off``: values, switches by their key."""
    def part(o: str) -> str:
        key, _, value = o.partition("=")
        last = key.split(".")[-1]
        return {"true": last, "false": last + "_off"}.get(value, value)
    stage, ov = case
    return "-".join([stage] + [part(o) for o in ov])


class TorchEngine:
    """The two engine calls the step body makes, on a plain torch optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


CPU = torch.device("cpu")


def build(stage_name: str, overrides=(), device=CPU, num_ranks: int = 1):
    """(task, trainable module, optimizer, config, plan) for a debug-config stage on ``device``."""
    cfg = load_config(str(ROOT / "configs" / CONFIG[stage_name]),
                      ["init.weights=null", f"scaling.num_workers={num_ranks}", *overrides])
    stage = get_stage(stage_name)
    sub = StageConfigs.of(cfg)
    labeled = stage.needs_labels
    plan = LaunchPlan(stage=stage_name, run_url="/tmp/unused", shard_urls=("a.tar",), num_samples=256,
                      image_size=cfg.model.img_size, num_ranks=num_ranks,
                      batch_size_per_rank=cfg.data.batch_size_per_rank, grad_accum=1,
                      global_batch=cfg.data.batch_size_per_rank * num_ranks, effective_lr=1e-3, steps_per_epoch=8,
                      total_steps=8, warmup_steps=0, num_classes=C if labeled else 0,
                      class_names=tuple(f"c{i}" for i in range(C)) if labeled else (),
                      unlabeled=(UnlabeledPlan(urls=("u.tar",), weight=1.0, num_samples=N_UNL, offsets=(0,)),)
                      if stage.needs_unlabeled else (), num_unlabeled=N_UNL if stage.needs_unlabeled else 0)
    torch.manual_seed(0)
    task, trainable = stage.build_task(sub, plan, device)
    opt = build_optimizer(stage.param_groups(sub, trainable), cfg.optim, plan.effective_lr)
    return task, trainable, opt, cfg, plan


def batches(cfg, seed: int = 0, rank: int = 0) -> Iterator[Dict]:
    """Endless loader-shaped batches: uint8 views, labels, boxes, unlabeled views, ids, corrupt counter, keys."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    n, s = cfg.data.batch_size_per_rank, cfg.model.img_size
    m = n * cfg.data.mu
    k = 0
    while True:
        def img(b):
            return torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)
        b = {"image": img(n), "label": torch.randint(0, C, (n,), generator=g),
             "box": torch.tensor([[2.0, 2.0, s - 2.0, s - 2.0]]).repeat(n, 1),
             "u_weak": img(m), "u_strong": img(m), "u_weak2": img(m),
             "u_label": torch.randint(-1, C, (m,), generator=g), "u_index": torch.randint(0, N_UNL, (m,), generator=g),
             "__corrupt__": torch.tensor([0, k % 3]), "__key__": [f"r{rank}-{k}-{i}" for i in range(n)]}
        k += 1
        yield b


class HostReads:
    """Counts device-to-host reads (``item``, ``tolist``, ``numpy``, ``cpu``, ``float()``, ``int()``,
    ``bool()``) made by ``ssfer_dist`` code while :attr:`on`; torch's and DeepSpeed's own calls are theirs.
    Tensors in ``allowed`` (the loader's CPU bookkeeping) are exempt."""

    NAMES = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__")

    def __init__(self):
        self.on = False
        self.allowed = set()
        self.calls: List[str] = []
        self._saved = {}

    def install(self, monkeypatch) -> "HostReads":
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, orig))
        return self

    def _wrap(self, name, orig):
        kit = self

        def wrapped(t, *a, **kw):
            if kit.on and id(t) not in kit.allowed:
                f = sys._getframe(1)
                mod = f.f_globals.get("__name__", "")
                if mod.startswith("ssfer_dist"):
                    kit.calls.append(f"{name} at {mod}:{f.f_lineno}")
            return orig(t, *a, **kw)
        return wrapped
