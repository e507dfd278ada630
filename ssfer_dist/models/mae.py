"""Masked autoencoder (He et al.) on a timm ViT encoder, laid out like facebookresearch/mae ``models_mae.py``.

The parameter names are the official ones (``cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*,
mask_token, decoder_*``), so published MAE / SSFER checkpoints load directly (:func:`import_mae_checkpoint`)
and :meth:`MAE.export_encoder` is a state dict a timm ``VisionTransformer(num_classes=0)`` loads strictly.
Given the same weights and ``noise`` the forward pass is the official one, number for number.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from functools import partial
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block

from ssfer_dist.errors import UserError
from ssfer_dist.models.io import save_weights
from ssfer_dist.models.vit import LN_EPS, build_vit, size_from_dims, vit_dims
from ssfer_dist.shards.schema import FACE_MEAN, FACE_STD

log = logging.getLogger(__name__)

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [(1 +) gs*gs, D], the official MAE construction (float64)."""
    gh = np.arange(grid_size, dtype=np.float64)
    gw = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, -1)  # grid[0]: column, grid[1]: row

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """[1, 1+g*g, D] -> [1, 1+new_grid^2, D]: bicubic interpolation of the patch part, cls row kept."""
    old = int(round(math.sqrt(pos_embed.shape[1] - 1)))
    if old == new_grid:
        return pos_embed
    return resample_abs_pos_embed(pos_embed.float(), new_size=[new_grid, new_grid], old_size=[old, old],
                                  num_prefix_tokens=1).to(pos_embed.dtype)


class MAE(nn.Module):
    """MAE with a ViT encoder of a named size and a light transformer decoder."""

    def __init__(self, size: str = "base", img_size: int = 224, patch_size: int = 16, norm_pix_loss: bool = False,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16):
        super().__init__()
        vit = build_vit(size, img_size, patch_size, num_classes=0)
        dim, _, _ = vit_dims(size)
        self.arch = dict(size=size, img_size=img_size, patch_size=patch_size, decoder_dim=decoder_dim,
                         decoder_depth=decoder_depth, decoder_heads=decoder_heads)
        self.patch_size = patch_size
        self.norm_pix_loss = norm_pix_loss
        # encoder: the timm modules themselves, under the official names
        self.patch_embed = vit.patch_embed
        num_patches = self.patch_embed.num_patches
        self.cls_token = vit.cls_token
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim), requires_grad=False)  # fixed sin-cos
        self.blocks = vit.blocks
        self.norm = vit.norm
        # decoder
        self.decoder_embed = nn.Linear(dim, decoder_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_dim), requires_grad=False)
        norm_layer = partial(nn.LayerNorm, eps=LN_EPS)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size ** 2 * 3, bias=True)
        self.grad_checkpointing = False
        self.initialize_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the encoder and decoder blocks (timm's ``checkpoint_seq``, as timm's
        ``VisionTransformer.set_grad_checkpointing``): blocks recompute their activations in backward."""
        self.grad_checkpointing = bool(enable)

    def _run_blocks(self, blocks, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint_seq(blocks, x)
        for blk in blocks:
            x = blk(x)
        return x

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """The official initialisation: sin-cos position embeddings, xavier linears, N(0, .02) tokens."""
        gs = int(round(math.sqrt(self.patch_embed.num_patches)))
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.pos_embed.shape[-1], gs)).float()[None])
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], gs)).float()[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # conv bias keeps PyTorch's default, as upstream
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, 3, H, W] -> [N, L, p*p*3] (pixel order (p, q, c) as in the official code)."""
        p = self.patch_size
        n, c, hh, ww = imgs.shape
        h, w = hh // p, ww // p
        x = imgs.reshape(n, c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, L, p*p*3] -> [N, 3, H, W]."""
        p = self.patch_size
        h = w = int(round(math.sqrt(x.shape[1])))
        x = x.reshape(x.shape[0], h, w, p, p, 3)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], 3, h * p, w * p)

    # ------------------------------------------------------------------ forward
    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        """Per-sample shuffle by argsort of noise; keep the first ``int(L * (1 - mask_ratio))``.

        x: [N, L, D]; noise: [N, L] in any float dtype (None: uniform). Returns (x_kept [N, K, D],
        mask [N, L] with 0 keep / 1 remove, ids_restore [N, L]).
        """
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif noise.shape != (n, length):
            raise ValueError(f"noise must be [N, L] = {[n, length]}, got {list(noise.shape)}")
        noise = noise.to(x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        x = self.patch_embed(imgs)                                  # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # [N, K, D]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)                              # [N, 1+K, D]
        x = self._run_blocks(self.blocks, x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)                                   # [N, 1+K, Dd]
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)           # [N, L, Dd] (shuffled order)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_pred(self.decoder_norm(x))                 # [N, 1+L, p*p*3]
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only (computed in float32).

        ``norm_pix_loss`` standardises each target patch with its mean and (unbiased, as the official
        code's ``Tensor.var``) variance: (x - mean) / sqrt(var + 1e-6).
        """
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)         # [N, L] per-patch loss
        mask = mask.float()
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: [N, 3, H, W] normalised -> (loss, pred [N, L, p*p*3], mask [N, L] 1 = masked)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # ------------------------------------------------------------------ export
    def export_encoder(self, img_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """The encoder's state dict (timm ``VisionTransformer(num_classes=0)`` keys, strict-loadable).

        With ``img_size`` different from the model's, the position embedding is interpolated to it.
        """
        out = {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
        if img_size is not None and img_size != self.arch["img_size"]:
            if img_size % self.patch_size:
                raise UserError(f"img_size {img_size} is not a multiple of patch_size {self.patch_size}")
            out["pos_embed"] = resize_pos_embed(out["pos_embed"], img_size // self.patch_size)
        return out


def build_mae(size: str = "base", img_size: int = 224, patch_size: int = 16, norm_pix_loss: bool = False,
              decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16) -> MAE:
    """An MAE with a ViT encoder of ``size`` (tiny|small|base|large|huge; micro for tests)."""
    return MAE(size, img_size, patch_size, norm_pix_loss, decoder_dim, decoder_depth, decoder_heads)


def _count_blocks(sd: Dict[str, torch.Tensor], prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def import_mae_checkpoint(path: str, img_size: Optional[int] = None, norm_pix_loss: bool = False,
                          decoder_heads: Optional[int] = None) -> MAE:
    """Load an official MAE / SSFER pretraining checkpoint (``{"model": state_dict, ...}``) into an :class:`MAE`.

    The architecture (encoder size, patch size, decoder width/depth) is read off the tensors; the
    decoder head count (not stored in tensors) is ``decoder_heads`` or else the official 16 (width 512) /
    width // 32. With ``img_size`` different from
    the checkpoint's, both position embeddings are interpolated. Loads with ``torch.load(weights_only=True)``.
    """
    if not os.path.exists(path):
        raise UserError(f"{path}: checkpoint not found")
    try:
        # main_pretrain.py stores its argparse.Namespace under "args": allow exactly that class
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refused or corrupt file
        raise UserError(f"{path}: not a loadable torch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise UserError(f"{path}: expected a dict with a 'model' state dict")
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    need = ["cls_token", "pos_embed", "patch_embed.proj.weight", "mask_token", "decoder_embed.weight",
            "decoder_pred.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise UserError(f"{path}: field 'model' lacks MAE keys {missing} (an encoder-only or fine-tuned checkpoint?)")
    dim = sd["cls_token"].shape[-1]
    depth = _count_blocks(sd, "blocks.")
    size = size_from_dims(dim, depth)
    if size is None:
        raise UserError(f"{path}: encoder width {dim} depth {depth} matches no known size")
    patch = sd["patch_embed.proj.weight"].shape[-1]
    grid = int(round(math.sqrt(sd["pos_embed"].shape[1] - 1)))
    ck_img = grid * patch
    dec_dim = sd["decoder_embed.weight"].shape[0]
    dec_depth = _count_blocks(sd, "decoder_blocks.")
    dec_heads = decoder_heads or (16 if dec_dim == 512 else max(1, dec_dim // 32))
    img = img_size or ck_img
    model = build_mae(size, img, patch, norm_pix_loss, dec_dim, dec_depth, dec_heads)
    if img != ck_img:
        if img % patch:
            raise UserError(f"img_size {img} is not a multiple of the checkpoint's patch size {patch}")
        log.info("interpolating position embeddings %dx%d -> %dx%d", grid, grid, img // patch, img // patch)
        for k in ("pos_embed", "decoder_pos_embed"):
            if k in sd:
                sd[k] = resize_pos_embed(sd[k], img // patch)
    own = model.state_dict()
    unexpected = [k for k in sd if k not in own]
    absent = [k for k in own if k not in sd]
    if absent:
        raise UserError(f"{path}: checkpoint lacks keys {absent[:5]}{'...' if len(absent) > 5 else ''}")
    if unexpected:
        log.warning("%s: ignoring %d extra keys (e.g. %s)", path, len(unexpected), unexpected[:3])
    bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise UserError(f"{path}: shape mismatch for {bad[:3]}: checkpoint {tuple(sd[bad[0]].shape)}, "
                        f"model {tuple(own[bad[0]].shape)}")
    model.load_state_dict({k: sd[k] for k in own}, strict=True)
    return model


def convert_mae_checkpoint(src: str, dst: str, img_size: Optional[int] = None, kind: str = "mae",
                           decoder_heads: Optional[int] = None) -> Dict:
    """Official MAE / SSFER ``.pth`` -> our safetensors weights file (``kind`` "mae" or "encoder"); returns meta.

    The result is what ``init.weights`` takes: an MAE to continue pretraining or an encoder to fine-tune.
    """

    if kind not in ("mae", "encoder"):
        raise UserError(f"kind must be 'mae' or 'encoder', got {kind!r}")
    model = import_mae_checkpoint(src, img_size=img_size, decoder_heads=decoder_heads)
    arch = dict(model.arch, num_classes=0, global_pool="token")
    meta = {"kind": kind, "arch": arch, "class_names": [], "mean": list(FACE_MEAN), "std": list(FACE_STD),
            "source": os.path.basename(src)}
    sd = model.state_dict() if kind == "mae" else model.export_encoder()
    save_weights(dst, sd, meta)
    return meta
