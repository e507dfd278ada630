"""FER classifier: the (pretrained) ViT encoder + a linear head, and optimizer parameter groups."""
from __future__ import annotations

from typing import Dict, List

import torch.nn as nn
from timm.layers import trunc_normal_

from ssfer_dist.errors import UserError
from ssfer_dist.models.vit import build_vit

# parameters that never get weight decay, besides every 1-d tensor (norms, biases)
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "dist_token", "decoder_pos_embed", "reg_token")


def build_classifier(size: str, img_size: int = 224, patch_size: int = 16, num_classes: int = 7,
                     global_pool: str = "token", drop_path: float = 0.1) -> nn.Module:
    """timm ``VisionTransformer`` with a ``num_classes`` linear head; returns logits [N, C].

    ``global_pool="token"`` classifies the cls token after the final norm; ``"avg"`` mean-pools the patch
    tokens and applies ``fc_norm`` (the MAE fine-tuning recipe). The head starts at N(0, 2e-5) and zero bias.
    """
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    model = build_vit(size, img_size, patch_size, num_classes=num_classes, global_pool=global_pool,
                      drop_path=drop_path)
    trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    model.arch = dict(size=size, img_size=img_size, patch_size=patch_size, num_classes=num_classes,
                      global_pool=global_pool)
    return model


def param_groups(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 1.0) -> List[Dict]:
    """Optimizer parameter groups from timm: layer-wise lr decay and no weight decay on norms, biases,
    position embeddings and tokens.

    Returns plain torch optimizer groups ``{"params": [...], "weight_decay": float, "lr_scale": float}``
    (DeepSpeed accepts them; the lr schedule multiplies by ``lr_scale``). With ``layer_decay != 1`` this is
    ``timm.optim.param_groups_layer_decay`` on the ViT's own ``group_matcher``: embeddings get
    ``layer_decay ** (depth + 1)``, block ``i`` ``layer_decay ** (depth - i)``, the head 1 (timm groups the
    final ``norm`` with the last block). Otherwise ``timm.optim.param_groups_weight_decay`` with
    ``lr_scale`` 1 — this also serves :class:`~ssfer_dist.models.mae.MAE`, which has no group matcher.
    Frozen parameters (``requires_grad=False``, e.g. MAE's fixed position embeddings) are left out.
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    no_decay = [f"*{n}" for n in NO_DECAY_NAMES]
    if layer_decay != 1.0:
        if not hasattr(model, "group_matcher"):
            raise UserError(f"layer_decay={layer_decay} needs a model with timm's group_matcher "
                            f"({type(model).__name__} has none); use layer_decay 1.0")
        groups = param_groups_layer_decay(model, weight_decay=float(weight_decay), no_weight_decay_list=no_decay,
                                          layer_decay=float(layer_decay))
    else:
        groups = param_groups_weight_decay(model, weight_decay=float(weight_decay), no_weight_decay_list=no_decay)
    out = []
    for g in groups:
        if g["params"]:
            out.append({"params": g["params"], "weight_decay": float(g["weight_decay"]),
                        "lr_scale": float(g.get("lr_scale", 1.0))})
    return out
