"""Weights files: safetensors with JSON metadata (``kind``, ``arch``, ``class_names``, ``mean``, ``std``).

The metadata is stored as one JSON string under the safetensors metadata key ``ssfer``:
``kind`` is ``"mae"`` | ``"encoder"`` | ``"classifier"``; ``arch`` is ``{size, img_size, patch_size,
num_classes, global_pool}`` (MAE files add the decoder fields).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ssfer_dist.errors import UserError
from ssfer_dist.models.classifier import build_classifier
from ssfer_dist.shards.schema import CLASS_NAMES, FACE_MEAN, FACE_STD

log = logging.getLogger(__name__)

META_KEY = "ssfer"
KINDS = ("mae", "encoder", "classifier")
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def save_weights(path: str, state_dict: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    """Write ``state_dict`` (cpu, contiguous copies) + ``meta`` to a safetensors file, atomically.

    ``meta`` must hold ``kind`` (one of mae|encoder|classifier) and ``arch`` (a dict with ``size``).
    """
    from safetensors.torch import save_file

    if meta.get("kind") not in KINDS:
        raise UserError(f"{path}: weights meta 'kind' must be one of {KINDS}, got {meta.get('kind')!r}")
    if not isinstance(meta.get("arch"), dict) or "size" not in meta["arch"]:
        raise UserError(f"{path}: weights meta 'arch' must be a dict with 'size'")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_weights(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a file written by :func:`save_weights` -> (state_dict on cpu, meta dict)."""
    from safetensors import safe_open

    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.exists(path):
        raise UserError(f"{path}: weights file not found")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:200]})") from None
    if raw is None:
        raise UserError(f"{path}: safetensors metadata lacks '{META_KEY}' (not written by ssfer save_weights)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: metadata '{META_KEY}' is not JSON ({e})") from None
    if meta.get("kind") not in KINDS or not isinstance(meta.get("arch"), dict):
        raise UserError(f"{path}: metadata needs 'kind' in {KINDS} and an 'arch' dict, got {raw[:200]}")
    return sd, meta


def read_meta(path: str) -> Dict[str, Any]:
    """The ``ssfer`` metadata of a weights file without reading its tensors (``{}`` when absent)."""
    from safetensors import safe_open

    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        return json.loads(raw) if raw else {}
    except Exception:
        return {}


def encoder_state(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The encoder part (timm ViT keys) of an MAE or classifier state dict."""
    return {k: v for k, v in sd.items() if k.startswith(ENCODER_PREFIXES)}


def classifier_from_weights(path: str, num_classes: Optional[int] = None, global_pool: Optional[str] = None,
                            drop_path: float = 0.0) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build a classifier from a weights file -> (model, meta).

    - ``classifier`` file: the full model; a ``num_classes`` that differs from the file's is a UserError.
    - ``encoder`` / ``mae`` file: the encoder loads into a fresh head of ``num_classes`` (required unless the
      metadata's ``arch`` has it). With ``global_pool="avg"`` the encoder's final ``norm`` is dropped and
      ``fc_norm`` starts fresh (MAE fine-tuning). Every encoder tensor must load (missing -> UserError).

    The returned meta is the file's, with ``kind="classifier"`` and the classifier's full ``arch``.
    """

    sd, meta = load_weights(path)
    arch = dict(meta["arch"])
    kind = meta["kind"]
    file_classes = arch.get("num_classes") or None
    if kind == "classifier":
        if file_classes is None:
            raise UserError(f"{path}: classifier metadata lacks arch.num_classes")
        if num_classes is not None and int(num_classes) != int(file_classes):
            raise UserError(f"{path}: the classifier has {file_classes} classes, {num_classes} were asked for")
        pool = arch.get("global_pool", "token")
        if global_pool is not None and global_pool != pool:
            raise UserError(f"{path}: the classifier uses global_pool={pool!r}, {global_pool!r} was asked for")
        model = build_classifier(arch["size"], arch["img_size"], arch["patch_size"], int(file_classes), pool,
                                 drop_path)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise UserError(f"{path}: weights do not fit arch {arch}: {str(e).splitlines()[0][:300]}") from None
    else:
        nc = num_classes if num_classes is not None else file_classes
        if not nc:
            raise UserError(f"{path}: an {kind} file has no head; pass num_classes")
        pool = global_pool or arch.get("global_pool") or "token"
        model = build_classifier(arch["size"], arch["img_size"], arch["patch_size"], int(nc), pool, drop_path)
        enc = encoder_state(sd)
        own = model.state_dict()
        if pool == "avg":
            enc = {k: v for k, v in enc.items() if not k.startswith("norm.")}
        missing = [k for k in own if k not in enc and not k.startswith(("head.", "fc_norm."))]
        extra = [k for k in enc if k not in own]
        if missing or extra:
            raise UserError(f"{path}: encoder keys do not fit a {arch['size']} ViT: missing {missing[:3]}, "
                            f"unexpected {extra[:3]}")
        bad = [k for k in enc if tuple(enc[k].shape) != tuple(own[k].shape)]
        if bad:
            raise UserError(f"{path}: shape mismatch at {bad[0]}: file {tuple(enc[bad[0]].shape)}, "
                            f"model {tuple(own[bad[0]].shape)} (image/patch size differ?)")
        model.load_state_dict(enc, strict=False)
    meta = dict(meta)
    meta["kind"] = "classifier"
    meta["arch"] = dict(model.arch)
    n = meta["arch"]["num_classes"]
    if not meta.get("class_names") and n in (7, 8):
        meta["class_names"] = list(CLASS_NAMES[:n])
    meta.setdefault("mean", list(FACE_MEAN))
    meta.setdefault("std", list(FACE_STD))
    return model, meta
