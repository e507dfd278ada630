"""The Stage: everything that differs between training stages, in one object.

A stage names its config section and declares what pre-flight must provide (labeled shards, the
unlabeled sources); it builds its task and the module DeepSpeed wraps, picks its data views and batched
streams, its optimizer parameter groups, the metadata of its export, and (optionally) a preview. The
loop (``train/loop.py``) and the launcher (``launchers/``) only call these methods.

Stages receive :class:`StageConfigs` (the sub-configs a stage may read, never the whole ``Config``) and
the frozen :class:`~ssfer_dist.plan.LaunchPlan`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ssfer_dist import storage
from ssfer_dist.config import Config, DataCfg, InitCfg, ModelCfg, OptimCfg, RunCfg, TrainCfg
from ssfer_dist.data.device_aug import DeviceAugment, place_views
from ssfer_dist.data.pipeline import Source, StreamSpec, View
from ssfer_dist.errors import UserError
from ssfer_dist.models.classifier import build_classifier, param_groups
from ssfer_dist.models.io import classifier_from_weights, read_meta
from ssfer_dist.plan import LaunchPlan
from ssfer_dist.shards.schema import FACE_MEAN, FACE_STD
from ssfer_dist.stages import get_stage
from ssfer_dist.tasks.base import Task

__all__ = ["Stage", "StageConfigs", "local_weights", "build_classifier_for", "rank_now"]

Views = Tuple[Tuple[View, ...], Tuple[View, ...]]


@dataclasses.dataclass(frozen=True)
class StageConfigs:
    """The sub-configs a stage reads: the shared ones plus its own ``section`` (None when it has none)."""

    run: RunCfg
    model: ModelCfg
    init: InitCfg
    data: DataCfg
    optim: OptimCfg
    train: TrainCfg
    section: Any = None

    @classmethod
    def of(cls, cfg: Config) -> "StageConfigs":
        name = get_stage(cfg.train.stage).section
        return cls(run=cfg.run, model=cfg.model, init=cfg.init, data=cfg.data, optim=cfg.optim, train=cfg.train,
                   section=getattr(cfg, name) if name else None)


def rank_now() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def local_weights(url: str) -> str:
    """A local path for ``init.weights`` (s3:// files are downloaded once per process; folders → model.safetensors)."""
    if not storage.is_s3(url):
        return url
    if not url.endswith(".safetensors"):
        url = storage.join(url, "model.safetensors")
    digest = hashlib.sha1(url.encode()).hexdigest()[:16]
    local = os.path.join(tempfile.gettempdir(), "ssfer-weights", digest + ".safetensors")
    if not os.path.exists(local):
        storage.get_file(url, local + f".{os.getpid()}")
        os.replace(local + f".{os.getpid()}", local)
    return local


def build_classifier_for(m: ModelCfg, init: InitCfg, num_classes: int, drop_path: Optional[float] = None) -> nn.Module:
    """A classifier from ``init.weights`` (an MAE / encoder / classifier export) or from scratch."""

    dp = m.drop_path if drop_path is None else drop_path
    if init.weights:
        model, meta = classifier_from_weights(local_weights(init.weights), num_classes=num_classes,
                                              global_pool=m.global_pool, drop_path=dp)
        arch = meta["arch"]
        if arch["img_size"] != m.img_size or arch["patch_size"] != m.patch_size or arch["size"] != m.size:
            raise UserError(f"init.weights {init.weights}: arch {arch} does not match model "
                            f"(size={m.size}, img_size={m.img_size}, patch_size={m.patch_size})")
        return model
    return build_classifier(m.size, m.img_size, m.patch_size, num_classes, m.global_pool, dp)


class Stage:
    """Base stage (defaults fit a supervised classifier stage); subclasses set ``name`` and ``build_task``."""

    name: str = ""
    section: Optional[str] = None     # its own section of the config tree (an attribute of Config)
    needs_labels: bool = True         # pre-flight: data.shards must be labeled (num_classes, class names)
    needs_unlabeled: bool = False     # pre-flight / config: reads data.unlabeled
    layer_decay: bool = True          # optim.layer_decay applies to its parameter groups
    model_ema: bool = False           # train.model_ema: the stage keeps an EMA of the weights (eval_module)

    # ---- config and pre-flight
    def config_problems(self, cfg: Config) -> List[Tuple[str, str]]:
        """Every stage-dependent problem of ``cfg`` as (key path, message), the first one first."""
        out = []
        if cfg.eval.shards and not self.needs_labels:
            out.append(("eval.shards", f"the {self.name} stage trains no classifier to evaluate"))
        return out + self.check_config(StageConfigs.of(cfg))

    def check_config(self, sub: StageConfigs) -> List[Tuple[str, str]]:
        """Cross-field problems as (key path, message); the config loader raises the first."""
        out = []
        if sub.train.model_ema and not self.model_ema:
            out.append(("train.model_ema", f"the {self.name} stage keeps no model EMA (facemix does; semisup "
                                           f"evaluates its EMA teacher with semisup.eval_model: teacher)"))
        if self.needs_unlabeled:
            if not sub.data.unlabeled:
                out.append(("data.unlabeled", f"{self.name} needs at least one unlabeled source"))
            for i, u in enumerate(sub.data.unlabeled):
                if not u.shards:
                    out.append((f"data.unlabeled[{i}].shards", "expected a shard folder/URL"))
                if u.weight <= 0:
                    out.append((f"data.unlabeled[{i}].weight", f"expected > 0, got {u.weight}"))
        return out

    def preflight(self, sub: StageConfigs, plan: LaunchPlan) -> None:
        """Stage-specific checks against the manifests' numbers (raise UserError naming the key)."""

    # ---- data
    def views(self, sub: StageConfigs) -> Views:
        """(labeled views, unlabeled views)."""
        return (View("image", "weak"),), ()

    def data_views(self, sub: StageConfigs) -> Views:
        """:meth:`views` placed: with ``data.augment_on: device`` the mae/weak views are decoded on the CPU and
        augmented on the training device (``data.device_aug``)."""

        lab, unl = self.views(sub)
        return place_views(lab, sub.data.augment_on), place_views(unl, sub.data.augment_on)

    def stream_specs(self, sub: StageConfigs, plan: LaunchPlan) -> List[StreamSpec]:
        """The batched streams the stage reads (the labeled/MAE stream by default)."""
        lab_views, _ = self.data_views(sub)
        return [StreamSpec(sources=(Source(tuple(plan.shard_urls), counts=tuple(plan.shard_counts)),), views=lab_views,
                           batch_size=sub.data.batch_size_per_rank, labeled=self.needs_labels,
                           raw_size=int(plan.image_size))]

    def device_augment(self, sub: StageConfigs, plan: LaunchPlan, rank: int):
        """The on-device half of the stage's views (``DeviceAugment``), or None when the CPU makes them all;
        the loop applies it to every micro-batch once it is on the device."""

        keys = {s.prefix + v.name: v.kind for s in self.stream_specs(sub, plan) for v in s.views if v.on_device}
        if not keys:
            return None
        d = sub.data
        # data.order shards: the loader stamps the global micro-batch index, unique over ranks (rank-free draws)
        return DeviceAugment(keys, sub.model.img_size, seed=sub.run.seed, rank=0 if d.order == "shards" else rank,
                             scale=d.crop_scale,
                             ratio=d.crop_ratio, interpolation=d.interpolation)

    # ---- model and optimisation
    def build_task(self, sub: StageConfigs, plan: LaunchPlan, device: torch.device) -> Tuple[Task, nn.Module]:
        """(task, trainable module). The trainable module is what DeepSpeed wraps."""
        raise NotImplementedError

    def param_groups(self, sub: StageConfigs, model: nn.Module) -> List[Dict[str, Any]]:
        """AdamW groups (no decay on norms/biases/tokens; layer-wise lr decay when the stage allows it)."""

        ld = sub.optim.layer_decay if (sub.optim.layer_decay and self.layer_decay) else 1.0
        return param_groups(model, weight_decay=sub.optim.weight_decay, layer_decay=ld)

    # ---- outputs
    def eval_module(self, sub: StageConfigs, task: Task) -> Optional[nn.Module]:
        """The full (never sharded) module evaluation and export use instead of the trained one — a model
        EMA, a teacher — or None: the trained module itself."""
        return None

    def export(self, sub: StageConfigs, plan: LaunchPlan, task: Task, sd: Dict[str, torch.Tensor]
               ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """(state dict, meta) for ``models.io.save_weights``; by default the classifier (``kind: classifier``)."""
        m = sub.model
        arch = dict(size=m.size, img_size=m.img_size, patch_size=m.patch_size, num_classes=int(plan.num_classes),
                    global_pool=m.global_pool)
        return sd, dict(self.export_base(sub, plan), kind="classifier", arch=arch, class_names=list(plan.class_names))

    def export_base(self, sub: StageConfigs, plan: LaunchPlan) -> Dict[str, Any]:
        """Metadata every export carries. ``trained_on``: the datasets of this run and of the runs its
        ``init.weights`` came from (``ssfer predict`` warns when they are the synthetic demo sets)."""
        trained_on = list(plan.datasets)
        if sub.init.weights:
            trained_on = list(read_meta(local_weights(sub.init.weights)).get("trained_on", [])) + trained_on
        return {"mean": list(FACE_MEAN), "std": list(FACE_STD), "stage": self.name, "run": sub.run.name,
                "steps": int(plan.total_steps), "trained_on": list(dict.fromkeys(trained_on))}

    def preview(self, task: Task, batch: Dict[str, Any], step: int, run_url: str, metrics_log, rank: int) -> None:
        """Called by every rank every ``train.preview_every`` steps; nothing by default."""
