"""Stage 1: MAE pretraining (ViT encoder + light decoder) on unlabeled faces → ``kind: mae`` weights."""
from __future__ import annotations

import io
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from ssfer_dist import storage
from ssfer_dist.data.pipeline import View
from ssfer_dist.distributed.engine import engine_dtype
from ssfer_dist.errors import UserError
from ssfer_dist.models.io import load_weights
from ssfer_dist.models.mae import build_mae
from ssfer_dist.plan import LaunchPlan
from ssfer_dist.shards.schema import FACE_MEAN, FACE_STD
from ssfer_dist.stages.base import Stage, StageConfigs, Views, local_weights, rank_now
from ssfer_dist.tasks import MAEPretrain
from ssfer_dist.tasks.base import Task
from ssfer_dist.tasks.common import prepare_images


PREVIEW_SAMPLES = 8
PREVIEW_ROWS = ("original", "masked", "reconstruction", "pasted")
PREVIEW_MIN_TILE = 96


def preview_grid(rows: List[np.ndarray], labels, title: str = "", min_tile: int = PREVIEW_MIN_TILE):
    """Rows of ``[N, H, W, 3]`` uint8 images → one labelled PIL image: a title line, then per row its label
    on the left and the N images scaled up (nearest, whole multiples) to at least ``min_tile`` px."""
    from PIL import Image, ImageDraw

    n, h, w = rows[0].shape[:3]
    scale = max(1, -(-min_tile // max(h, w)))            # ceil(min_tile / side)
    th, tw, gap, label_w, title_h = h * scale, w * scale, 4, 110, 18 if title else 0
    out = Image.new("RGB", (label_w + n * (tw + gap), title_h + len(rows) * (th + gap)), (24, 24, 24))
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((4, 3), title, fill=(235, 235, 235))
    for r, (row, label) in enumerate(zip(rows, labels)):
        y = title_h + r * (th + gap)
        draw.text((6, y + th // 2 - 6), label, fill=(235, 235, 235))
        for i in range(n):
            tile = Image.fromarray(row[i]).resize((tw, th), Image.NEAREST)
            out.paste(tile, (label_w + i * (tw + gap), y))
    return out


class MAEStage(Stage):
    name = "mae"
    section = None                    # reads model.* (mask_ratio, decoder) only
    needs_labels = False
    layer_decay = False

    def views(self, sub: StageConfigs) -> Views:
        return (View("image", "mae"),), ()

    def build_task(self, sub: StageConfigs, plan: LaunchPlan, device: torch.device) -> Tuple[Task, nn.Module]:
        m = sub.model
        dtype = engine_dtype(sub.train)
        model = build_mae(m.size, m.img_size, m.patch_size, m.norm_pix_loss, m.decoder_dim, m.decoder_depth,
                          m.decoder_heads)
        if sub.init.weights:
            sd, _meta = load_weights(local_weights(sub.init.weights))
            _missing, unexpected = model.load_state_dict(sd, strict=False)
            if unexpected:
                raise UserError(f"init.weights {sub.init.weights}: unexpected keys {unexpected[:3]} for an MAE")
        model.to(device)
        task = MAEPretrain(model, mask_ratio=m.mask_ratio, input_dtype=None if dtype == torch.float32 else dtype,
                           noise_seed=sub.run.seed, rank=rank_now())
        return task, model

    def export(self, sub: StageConfigs, plan: LaunchPlan, task: Task, sd: Dict[str, torch.Tensor]
               ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """The full MAE weights (``kind: mae``); the encoder loads into a classifier."""
        m = sub.model
        arch = dict(task.model.arch) if hasattr(task.model, "arch") else {}
        arch.update(size=m.size, img_size=m.img_size, patch_size=m.patch_size, num_classes=0,
                    global_pool=m.global_pool)
        return sd, dict(self.export_base(sub, plan), kind="mae", arch=arch, class_names=[])

    @torch.no_grad()
    def preview(self, task: Task, batch: Dict[str, Any], step: int, run_url: str, metrics_log, rank: int) -> None:
        """Original / masked / reconstruction / pasted rows of up to 8 images, each scaled up to at least
        96 px, with row labels → ``previews/step_XXXXXXXX.png``. Every rank runs the forward (ZeRO-3
        gathers need all ranks); rank 0 writes."""
        model = task.model
        x = prepare_images(batch["image"][:PREVIEW_SAMPLES], task.input_dtype)
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
        msk = inner.unpatchify(mask.unsqueeze(-1).repeat(1, 1, p * p * 3))   # 1 = masked
        masked = x * (1 - msk)
        paste = x * (1 - msk) + rec * msk

        def to_img(t: torch.Tensor) -> np.ndarray:
            t = (t * std + mean).clamp(0, 1)
            return (t.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)

        rows: List[np.ndarray] = [to_img(t) for t in (x, masked, rec, paste)]
        image = preview_grid(rows, PREVIEW_ROWS, title=f"MAE step {step}, mask ratio {task.mask_ratio:g}")
        grid = np.asarray(image)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        storage.put_bytes(storage.join(run_url, "previews", f"step_{step:08d}.png"), buf.getvalue())
        if metrics_log is not None:
            metrics_log.add_image("mae/preview", torch.from_numpy(grid).permute(2, 0, 1), step)


STAGE = MAEStage()
