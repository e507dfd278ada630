"""Stage wiring: config sub-sections → models and tasks, data views, export metadata.

Each builder takes the sub-configs it needs plus runtime values (the launch plan, device); the step
loop itself stays stage-agnostic.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ssfer_dist.config import Config
from ssfer_dist.data.pipeline import Source, StreamSpec, View, stage_views
from ssfer_dist.data.schema import FACE_MEAN, FACE_STD
from ssfer_dist.distributed.engine import engine_dtype
from ssfer_dist.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["build_task", "param_groups_for", "bind_engine", "stream_specs", "after_step", "extra_state",
           "load_extra_state", "export_weights", "mae_preview"]


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def local_weights(url: str) -> str:
    """A local path for ``init.weights`` (s3:// files are downloaded once per process; folders → model.safetensors)."""
    from ssfer_dist import storage

    if not storage.is_s3(url):
        return url
    if not url.endswith(".safetensors"):
        url = storage.join(url, "model.safetensors")
    import hashlib
    import tempfile

    local = os.path.join(tempfile.gettempdir(), "ssfer-weights", hashlib.sha1(url.encode()).hexdigest()[:16] + ".safetensors")
    if not os.path.exists(local):
        storage.get_file(url, local + f".{os.getpid()}")
        os.replace(local + f".{os.getpid()}", local)
    return local


def _build_classifier(cfg: Config, num_classes: int) -> nn.Module:
    from ssfer_dist.models.classifier import build_classifier
    from ssfer_dist.models.io import classifier_from_weights

    m = cfg.model
    if cfg.init.weights:
        model, meta = classifier_from_weights(local_weights(cfg.init.weights), num_classes=num_classes,
                                              global_pool=m.global_pool, drop_path=m.drop_path)
        arch = meta["arch"]
        if arch["img_size"] != m.img_size or arch["patch_size"] != m.patch_size or arch["size"] != m.size:
            raise UserError(f"init.weights {cfg.init.weights}: arch {arch} does not match model "
                            f"(size={m.size}, img_size={m.img_size}, patch_size={m.patch_size})")
        return model
    return build_classifier(m.size, m.img_size, m.patch_size, num_classes, m.global_pool, m.drop_path)


def build_task(cfg: Config, plan: Dict[str, Any], device: torch.device) -> Tuple[Any, nn.Module]:
    """(task, trainable module). The trainable module is what DeepSpeed wraps."""
    from ssfer_dist import tasks

    dtype = engine_dtype(cfg.train)
    input_dtype = None if dtype == torch.float32 else dtype
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    stage = cfg.train.stage
    m = cfg.model
    if stage == "mae":
        from ssfer_dist.models.mae import build_mae

        model = build_mae(m.size, m.img_size, m.patch_size, m.norm_pix_loss, m.decoder_dim, m.decoder_depth,
                          m.decoder_heads)
        if cfg.init.weights:
            from ssfer_dist.models.io import load_weights

            sd, meta = load_weights(local_weights(cfg.init.weights))
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if unexpected:
                raise UserError(f"init.weights {cfg.init.weights}: unexpected keys {unexpected[:3]} for an MAE")
        model.to(device)
        task = tasks.MAEPretrain(model, mask_ratio=m.mask_ratio, input_dtype=input_dtype,
                                 noise_seed=cfg.run.seed, rank=rank)
        return task, model
    num_classes = int(plan["num_classes"])
    model = _build_classifier(cfg, num_classes).to(device)
    if stage == "facemix":
        f = cfg.facemix
        task = tasks.FaceMixFinetune(model, num_classes, alpha=f.alpha, smoothing=f.label_smoothing,
                                     seed=cfg.run.seed, rank=rank, facemix_prob=1.0 if f.enabled else 0.0,
                                     input_dtype=input_dtype)
        return task, model
    from ssfer_dist.ssl.ema import EMATeacher
    from ssfer_dist.ssl.thresholds import build_threshold

    s = cfg.semisup
    th = s.threshold
    kw: Dict[str, Any] = {"fixed": {"tau": th.tau},
                          "dtm": {"tau0": th.dtm_init, "momentum": th.dtm_momentum},
                          "freematch": {"momentum": th.freematch_momentum},
                          "flexmatch": {"num_samples": int(plan.get("num_unlabeled", 0)), "tau": th.flexmatch_tau,
                                        "warmup": th.flexmatch_warmup}}[th.kind]
    threshold = build_threshold(th.kind, num_classes, all_reduce=_all_reduce_sum, **kw)
    teacher = EMATeacher(model, decay=s.ema_decay, device=device)
    task = tasks.SemiSupervised(model, teacher, threshold, num_classes, lambda_u=s.lambda_u, mu=cfg.data.mu,
                                smoothing=s.label_smoothing,
                                round_steps=th.dtm_every if th.kind == "dtm" else 0, input_dtype=input_dtype)
    return task, model


def param_groups_for(cfg: Config, model: nn.Module) -> List[Dict[str, Any]]:
    """AdamW groups (no decay on norms/biases/tokens; layer-wise lr decay for classifiers)."""
    from ssfer_dist.models.classifier import param_groups

    ld = cfg.optim.layer_decay if (cfg.optim.layer_decay and cfg.train.stage != "mae") else 1.0
    return param_groups(model, weight_decay=cfg.optim.weight_decay, layer_decay=ld)


def bind_engine(task: Any, engine) -> None:
    """Tasks keep calling the raw module: DeepSpeed's ZeRO-3 hooks live on it, and the engine owns
    backward/step. Nothing to rebind; kept as the one place to change if that ever differs."""
    return None


def stream_specs(cfg: Config, plan: Dict[str, Any]) -> List[StreamSpec]:
    """The batched streams a stage reads (labeled/MAE stream, plus the unlabeled one for semisup)."""
    th_kind = cfg.semisup.threshold.kind
    lab_views, unl_views = stage_views(cfg.train.stage, th_kind)
    specs = [StreamSpec(sources=(Source(tuple(plan["shard_urls"])),), views=lab_views,
                        batch_size=cfg.data.batch_size_per_rank, labeled=cfg.train.stage != "mae")]
    if cfg.train.stage == "semisup":
        ids = th_kind == "flexmatch"  # per-sample state: samples carry their manifest row as an id
        srcs = tuple(Source(tuple(u["urls"]), u["weight"], tuple(u["offsets"]) if ids else ())
                     for u in plan["unlabeled"])
        specs.append(StreamSpec(sources=srcs, views=unl_views, batch_size=cfg.data.batch_size_per_rank * cfg.data.mu,
                                labeled=False, prefix="u_"))
    return specs


def after_step(task: Any, step: int, gather: Callable) -> Dict[str, Any]:
    fn = getattr(task, "after_step", None)
    return fn(step, gather) if fn is not None else {}


def extra_state(task: Any) -> Dict[str, Any]:
    fn = getattr(task, "state_dict", None)
    return fn() if fn is not None else {}


def load_extra_state(task: Any, state: Dict[str, Any]) -> None:
    fn = getattr(task, "load_state_dict", None)
    if fn is not None and state:
        fn(state)


def export_weights(cfg: Config, plan: Dict[str, Any], task: Any, sd: Dict[str, torch.Tensor]
                   ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, meta) for ``models.io.save_weights``: MAE → full MAE weights (``kind: mae``,
    the encoder loads into a classifier); classifiers → the student (``kind: classifier``)."""
    m = cfg.model
    base = {"mean": list(FACE_MEAN), "std": list(FACE_STD), "stage": cfg.train.stage, "run": cfg.run.name,
            "steps": int(plan["total_steps"])}
    if cfg.train.stage == "mae":
        arch = dict(task.model.arch) if hasattr(task.model, "arch") else {}
        arch.update(size=m.size, img_size=m.img_size, patch_size=m.patch_size, num_classes=0,
                    global_pool=m.global_pool)
        return sd, dict(base, kind="mae", arch=arch, class_names=[])
    arch = dict(size=m.size, img_size=m.img_size, patch_size=m.patch_size, num_classes=int(plan["num_classes"]),
                global_pool=m.global_pool)
    return sd, dict(base, kind="classifier", arch=arch, class_names=list(plan["class_names"]))


@torch.no_grad()
def mae_preview(task: Any, batch: Dict[str, Any], step: int, run_url: str, metrics_log, rank: int) -> None:
    """Original / masked / reconstruction grid of up to 4 images → ``previews/step_XXXXXXXX.png``.
    Every rank runs the forward (ZeRO-3 gathers need all ranks); rank 0 writes."""
    import numpy as np
    from PIL import Image

    from ssfer_dist import storage
    from ssfer_dist.tasks.common import prepare_images

    model = task.model
    x = prepare_images(batch["image"][:4], task.input_dtype)
    was_training = model.training
    model.eval()
    _loss, pred, mask = model(x, mask_ratio=task.mask_ratio)
    model.train(was_training)
    if rank != 0:
        return
    inner = getattr(model, "module", model)
    mean = torch.tensor(FACE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(FACE_STD).view(1, 3, 1, 1)
    x = x.float().cpu()
    pred = pred.float().cpu()
    mask = mask.float().cpu()
    if getattr(inner, "norm_pix_loss", False):
        target = inner.patchify(x)
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mu
    rec = inner.unpatchify(pred)
    p = inner.patch_size
    m = mask.unsqueeze(-1).repeat(1, 1, p * p * 3)
    m = inner.unpatchify(m)                                   # 1 = masked
    masked = x * (1 - m)
    paste = x * (1 - m) + rec * m

    def to_img(t: torch.Tensor) -> np.ndarray:
        t = (t * std + mean).clamp(0, 1)
        return (t.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)

    rows = [np.concatenate(list(to_img(t)), axis=1) for t in (x, masked, rec, paste)]
    grid = np.concatenate(rows, axis=0)
    import io

    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    storage.put_bytes(storage.join(run_url, "previews", f"step_{step:08d}.png"), buf.getvalue())
    if metrics_log is not None:
        metrics_log.add_image("mae/preview", torch.from_numpy(grid).permute(2, 0, 1), step)
