"""``ssfer export``: a classifier to safetensors, ONNX or TorchScript, with class names and the input
normalisation travelling inside the file:

- safetensors: the ``ssfer`` JSON metadata (``models.io``): kind, arch, class_names, mean, std;
- ONNX: ``metadata_props`` keys ``ssfer`` (the same JSON), ``class_names`` (JSON list), ``mean``, ``std``
  (JSON lists), ``input`` (a description); input ``image`` float32 [N, 3, S, S] normalised with mean/std,
  output ``logits`` [N, C]; the batch axis is dynamic;
- TorchScript: a traced module with ``_extra_files={"ssfer.json": <the same JSON>}``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional

from ssfer_dist.errors import UserError
from ssfer_dist.evaluate import _load_model

log = logging.getLogger(__name__)

__all__ = ["export_weights", "export_cli", "FORMATS", "read_onnx_meta"]

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".torchscript.pt"}
INPUT_DOC = "image: float32 [N,3,S,S], RGB in [0,1] then (x - mean) / std; output logits [N,C] in class_names order"


def _default_out(weights: str, fmt: str) -> str:
    path = os.path.join(weights, "model.safetensors") if os.path.isdir(weights) else weights
    stem = path[: -len(".safetensors")] if path.endswith(".safetensors") else os.path.splitext(path)[0]
    out = stem + FORMATS[fmt]
    if fmt == "safetensors":
        out = stem + ".export.safetensors"
    return out


def _meta_json(meta: Dict[str, Any]) -> str:
    keep = {k: meta[k] for k in ("kind", "arch", "class_names", "mean", "std") if k in meta}
    return json.dumps(keep, sort_keys=True)


def export_weights(weights: str, fmt: str, out: Optional[str] = None) -> str:
    """Export classifier ``weights`` to ``fmt``; returns the written path (written atomically)."""
    import torch

    from ssfer_dist.models.io import save_weights

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}")
    model, meta = _load_model(weights)
    out = out or _default_out(weights, fmt)
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(out)}")
    s = int(meta["arch"]["img_size"])
    dummy = torch.zeros(2, 3, s, s)
    mj = _meta_json(meta)
    try:
        if fmt == "safetensors":
            save_weights(out, model.state_dict(), json.loads(mj))
            return out
        if fmt == "onnx":
            _export_onnx(model, dummy, tmp, meta, mj)
        else:
            import warnings

            with torch.no_grad(), warnings.catch_warnings():
                # torch.jit is deprecated but still the format users load
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace(model, dummy, check_trace=False)
                torch.jit.save(traced, tmp, _extra_files={"ssfer.json": mj})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("exported %s -> %s", weights, out)
    return out


def _export_onnx(model, dummy, path: str, meta: Dict[str, Any], mj: str) -> None:
    import onnx
    import torch

    try:
        torch.onnx.export(model, (dummy,), path, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    except TypeError:  # older torch without the dynamo switch
        torch.onnx.export(model, (dummy,), path, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    m = onnx.load(path)
    props = {"ssfer": mj, "class_names": json.dumps(list(meta.get("class_names") or [])),
             "mean": json.dumps(list(meta.get("mean") or [])), "std": json.dumps(list(meta.get("std") or [])),
             "input": INPUT_DOC}
    del m.metadata_props[:]
    for k, v in props.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    onnx.checker.check_model(m)
    onnx.save(m, path)


def read_onnx_meta(path: str) -> Dict[str, Any]:
    """The ``ssfer`` metadata JSON of an exported ONNX file."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    if "ssfer" not in props:
        raise UserError(f"{path}: ONNX metadata_props lacks 'ssfer' (not written by ssfer export)")
    return json.loads(props["ssfer"])


def export_cli(weights: str, fmt: str, out: Optional[str] = None) -> int:
    """``ssfer export``: print the written path."""
    path = export_weights(weights, fmt, out)
    print(f"wrote {path} ({fmt}, {os.path.getsize(path)} bytes)")
    return 0
