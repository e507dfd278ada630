"""ViT sizes on timm's ``VisionTransformer`` (layout of ``vit_*_patch16_224``)."""
from __future__ import annotations

from functools import partial
from typing import Dict, Optional

import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from ssfer_dist.errors import UserError

# name -> (embed_dim, depth, num_heads). "micro" exists for fast tests and debug configs.
SIZES: Dict[str, tuple] = {
    "micro": (64, 2, 2),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}

LN_EPS = 1e-6


def vit_dims(size: str) -> tuple:
    """(embed_dim, depth, num_heads) of a named size; UserError for unknown names."""
    if size not in SIZES:
        raise UserError(f"model size {size!r} is not one of {sorted(SIZES)}")
    return SIZES[size]


def size_from_dims(embed_dim: int, depth: int) -> Optional[str]:
    """The size name with these dimensions, or None."""
    for name, (d, n, _) in SIZES.items():
        if d == embed_dim and n == depth:
            return name
    return None


def build_vit(size: str, img_size: int = 224, patch_size: int = 16, num_classes: int = 0,
              global_pool: str = "token", drop_path: float = 0.0) -> VisionTransformer:
    """A timm ``VisionTransformer`` of a named size (qkv bias, LayerNorm eps 1e-6, mlp ratio 4).

    ``num_classes=0`` gives the bare encoder (no head): exactly the keys ``MAE.export_encoder`` writes.
    """
    if global_pool not in ("token", "avg"):
        raise UserError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
    if img_size % patch_size:
        raise UserError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    dim, depth, heads = vit_dims(size)
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, num_classes=num_classes, global_pool=global_pool,
        embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4.0, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=LN_EPS), drop_path_rate=drop_path,
    )
