"""FER classifier: the (pretrained) ViT encoder + a linear head, and optimizer parameter groups."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
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


def _layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings/tokens, i+1 for ``blocks.i``, ``num_layers`` for everything after the blocks."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token", "dist_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def _is_no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES or name in NO_DECAY_NAMES


def param_groups(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 1.0,
                 named_parameters: Optional[Iterable[Tuple[str, torch.nn.Parameter]]] = None) -> List[Dict]:
    """Optimizer parameter groups: layer-wise lr decay and no weight decay on norms/biases/pos-embed/tokens.

    Returns a list of dicts ``{"params": [...], "weight_decay": float, "lr_scale": float, "name": str}``
    (plain torch optimizer groups; DeepSpeed accepts them, the lr schedule multiplies by ``lr_scale``).
    Block ``i`` gets ``layer_decay ** (num_layers - (i + 1))`` with ``num_layers = depth + 1``; the
    embeddings ``layer_decay ** num_layers``; head, final norm and the MAE decoder 1. Frozen parameters
    (``requires_grad=False``, e.g. MAE's fixed position embeddings) are left out; empty groups are dropped.
    Works for the classifier and for :class:`~ssfer_dist.models.mae.MAE` (use ``layer_decay=1``).
    """
    named = list(named_parameters if named_parameters is not None else model.named_parameters())
    depth = len(getattr(model, "blocks", [])) if hasattr(model, "blocks") else 0
    num_layers = depth + 1
    groups: Dict[str, Dict] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        lid = _layer_id(name, num_layers) if layer_decay != 1.0 else num_layers
        no_decay = _is_no_decay(name, p)
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else float(weight_decay),
                           "lr_scale": float(layer_decay ** (num_layers - lid)), "name": key}
        groups[key]["params"].append(p)
    return [g for g in groups.values() if g["params"]]
