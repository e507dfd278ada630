"""Evaluation while training (``eval.shards``, ``eval.every_steps``): accuracy, mean class accuracy and
macro-F1 of the stage's classifier on labeled shards, computed by all ranks together.

Each rank decodes its slice of the eval set (sample ``i`` belongs to rank ``i % world``:
:func:`ssfer_dist.evaluate.labeled_samples`), runs the model on the training device and adds its
predictions into a confusion matrix kept on the device; the confusions (and the corrupt counts) are summed
over ranks with one ``collectives.all_reduce_sum`` and read to the host once. Ranks run the same number
of forwards (one small ``all_reduce_max`` per batch says whether any rank still has data; a rank whose
slice is done forwards a dummy batch): a ZeRO-3 student gathers its parameters in every forward, which
only works when every rank takes part. The metric definitions are ``ssfer evaluate``'s
(:func:`ssfer_dist.evaluate.confusion_metrics`), so the numbers match it on the same weights.

:class:`Evaluator` owns the cadence (``eval.every_steps`` and the last step), evaluates what the stage
evaluates (its ``eval_module``, else the trained module) and exports the best weights to ``export/best/``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch

from ssfer_dist import storage
from ssfer_dist.config import EvalCfg
from ssfer_dist.data.transforms import build_transform
from ssfer_dist.distributed import collectives
from ssfer_dist.evaluate import confusion_metrics, labeled_samples
from ssfer_dist.stages.base import StageConfigs
from ssfer_dist.tasks.common import prepare_images
from ssfer_dist.train.export import export_state_dict, write_export
from ssfer_dist.plan import LaunchPlan
from ssfer_dist.train.state import TrainState

log = logging.getLogger(__name__)

__all__ = ["Evaluator", "TrainingEval", "EVAL_KEYS", "eval_record"]

EVAL_KEYS = ("accuracy", "mean_class_accuracy", "macro_f1")


class TrainingEval:
    """The eval set of one run, evaluated by every rank together (see the module docstring)."""

    def __init__(self, urls: Sequence[str], class_names: Sequence[str], img_size: int, batch_size: int,
                 rank: int, world: int, device: torch.device, max_member_bytes: int):
        self.urls, self.class_names = tuple(urls), list(class_names)
        self.num_classes = len(self.class_names)
        self.img_size, self.batch_size = int(img_size), int(batch_size)
        self.rank, self.world, self.device = int(rank), int(world), device
        self.max_member_bytes = int(max_member_bytes)
        self.tf = build_transform("eval", self.img_size, uint8=True)

    def _batches(self, counts: Dict[str, int]):
        xs, ys = [], []
        for x, y in labeled_samples(self.urls, self.tf, self.num_classes, self.max_member_bytes, self.rank,
                                    self.world, counts):
            xs.append(x)
            ys.append(y)
            if len(xs) == self.batch_size:
                yield torch.stack(xs), torch.tensor(ys, dtype=torch.long)
                xs, ys = [], []
        if xs:
            yield torch.stack(xs), torch.tensor(ys, dtype=torch.long)

    @torch.no_grad()
    def confusion(self, forward: Callable[[torch.Tensor], torch.Tensor],
                  input_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
        """``forward``: images [N,3,H,W] (normalised, ``input_dtype``) -> logits [N,C]. Every rank must call
        this. Returns ``{"confusion": int64 [C, C] (true, predicted; all ranks), "corrupt": int}``."""
        c = self.num_classes
        conf = torch.zeros(c * c, dtype=torch.float64, device=self.device)
        counts: Dict[str, int] = {}
        it = self._batches(counts)
        dummy = torch.zeros(1, 3, self.img_size, self.img_size, dtype=torch.uint8)
        while True:
            b = next(it, None)
            more = torch.tensor([0 if b is None else 1], dtype=torch.int32, device=self.device)
            if int(collectives.all_reduce_max(more).item()) == 0:
                break
            x = (dummy if b is None else b[0]).to(self.device, non_blocking=True)
            logits = forward(prepare_images(x, input_dtype))
            if b is not None:
                y = b[1].to(self.device, non_blocking=True)
                pred = logits.argmax(dim=-1)
                conf.index_add_(0, y * c + pred, torch.ones_like(pred, dtype=torch.float64))
        local_corrupt = torch.tensor([float(counts.get("corrupt", 0))], dtype=torch.float64, device=self.device)
        total = collectives.all_reduce_sum(torch.cat([conf, local_corrupt]))
        host = total.cpu().numpy()                            # the evaluation's one host read
        return {"confusion": np.rint(host[:-1]).astype(np.int64).reshape(c, c), "corrupt": int(round(host[-1]))}

    def metrics(self, forward: Callable[[torch.Tensor], torch.Tensor],
                input_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
        """:meth:`confusion` → ``confusion_metrics`` (same on every rank)."""
        r = self.confusion(forward, input_dtype)
        m = confusion_metrics(r["confusion"], self.class_names)
        m["num_corrupt"] = r["corrupt"]
        return m


def eval_record(m: Dict[str, Any], which: str) -> Dict[str, Any]:
    """The ``eval_*`` keys a metrics line carries for one evaluation."""
    out: Dict[str, Any] = {f"eval_{k}": float(m[k]) for k in EVAL_KEYS}
    out.update(eval_num_samples=int(m["num_samples"]), eval_corrupt=int(m["num_corrupt"]),
               eval_weights=which, eval_confusion=m["confusion"])
    return out


class Evaluator:
    """Evaluation while training on every worker (``eval.shards``): :meth:`should_eval` (``eval.every_steps``
    and the last step; never without an eval set), :meth:`run` (every rank takes part), the best weights by
    ``eval.best_metric`` exported to ``<run>/export/best/`` with ``eval.json``."""

    def __init__(self, cfg: EvalCfg, plan: LaunchPlan, stage, sub: StageConfigs, *, rank: int, world: int,
                 device: torch.device, img_size: int, max_member_bytes: int, dtype: torch.dtype, zero_stage: int,
                 label: str) -> None:
        self.every_steps, self.best_metric = int(cfg.every_steps), cfg.best_metric
        self.plan, self.stage, self.sub = plan, stage, sub
        self.rank, self.zero_stage, self.label = rank, int(zero_stage), label
        self.input_dtype = None if dtype == torch.float32 else dtype     # the trained module's input dtype
        self.data = TrainingEval(plan.eval_urls, plan.class_names, img_size, cfg.batch_size_per_rank, rank,
                                 world, device, max_member_bytes) if plan.eval_urls else None

    def should_eval(self, step: int) -> bool:
        if self.data is None:
            return False
        return step >= self.plan.total_steps or (self.every_steps > 0 and step % self.every_steps == 0)

    def evaluate(self, task, engine) -> Dict[str, Any]:
        """One evaluation of what the stage evaluates (``eval_module``, else the trained module in eval mode);
        every rank takes part. Returns the ``eval_*`` record keys."""
        em = self.stage.eval_module(self.sub, task)
        if em is not None:
            return eval_record(self.data.metrics(em, None), "ema")
        engine.module.eval()
        try:
            m = self.data.metrics(engine, self.input_dtype)
        finally:
            engine.module.train()
        return eval_record(m, "trained")

    def run(self, task, engine, state: TrainState, beat: Callable[[str], None]) -> Dict[str, Any]:
        """Evaluate at ``state.step``; a new best (the same decision on every rank) goes into ``state`` and
        ``export/best/``. Returns the ``eval_*`` keys of the step's record (``eval_best`` among them)."""
        beat(f"step {state.step}: evaluation")
        ev = self.evaluate(task, engine)
        value = ev[f"eval_{self.best_metric}"]
        best = state.best_eval is None or value > state.best_eval
        ev["eval_best"] = bool(best)
        if best:
            state.best_eval, state.best_step = value, state.step
            beat(f"step {state.step}: export/best")
            sd = export_state_dict(self.stage, self.sub, task, engine, self.zero_stage, self.rank)
            if self.rank == 0:
                write_export(self.stage, self.sub, self.plan, task, sd,
                             storage.join(self.plan.run_url, "export", "best", "model.safetensors"),
                             {"step": state.step, "metric": self.best_metric, **ev})
        if self.rank == 0:
            log.info("[%s] step %d eval: accuracy %.4f  mean class accuracy %.4f  macro-F1 %.4f%s", self.label,
                     state.step, ev["eval_accuracy"], ev["eval_mean_class_accuracy"], ev["eval_macro_f1"],
                     "  (best)" if best else "")
        return ev
