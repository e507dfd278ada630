"""ssfer export: ONNX parity with onnxruntime, TorchScript and safetensors metadata, bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ssfer_dist.cli import main
from ssfer_dist.shards.schema import CLASS_NAMES, FACE_MEAN, FACE_STD
from ssfer_dist.errors import UserError
from ssfer_dist.export import export_weights, read_onnx_meta
from ssfer_dist.models.classifier import build_classifier
from ssfer_dist.models.io import load_weights, save_weights


def make_weights(path, num_classes=7, kind="classifier", seed=0, img_size=32, patch=8):
    torch.manual_seed(seed)
    m = build_classifier("micro", img_size, patch, num_classes, "avg", 0.0)
    torch.nn.init.normal_(m.head.weight, std=0.5)  # non-trivial logits
    sd = m.state_dict()
    if kind == "encoder":
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    meta = {"kind": kind, "arch": dict(m.arch), "class_names": list(CLASS_NAMES[:num_classes]),
            "mean": list(FACE_MEAN), "std": list(FACE_STD)}
    save_weights(str(path), sd, meta)
    return m.eval()


def test_onnx_same_logits_and_metadata(tmp_path):
    import onnxruntime as ort

    w = tmp_path / "model.safetensors"
    model = make_weights(w)
    out = export_weights(str(w), "onnx", str(tmp_path / "m.onnx"))
    meta = read_onnx_meta(out)
    assert meta["class_names"] == list(CLASS_NAMES[:7])
    assert meta["mean"] == list(FACE_MEAN) and meta["std"] == list(FACE_STD)
    assert meta["arch"]["img_size"] == 32
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)  # batch 5: dynamic axis
    (got,) = sess.run(["logits"], {"image": x})
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == (5, 7)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(want).max() > 1e-2  # the comparison is not between zeros


def test_torchscript_and_safetensors(tmp_path):
    w = tmp_path / "model.safetensors"
    model = make_weights(w, seed=1)
    ts = export_weights(str(w), "torchscript")
    assert ts.endswith(".torchscript.pt")
    extra = {"ssfer.json": ""}
    loaded = torch.jit.load(ts, _extra_files=extra)
    meta = json.loads(extra["ssfer.json"])
    assert meta["class_names"] == list(CLASS_NAMES[:7]) and meta["std"] == list(FACE_STD)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    st = export_weights(str(w), "safetensors", str(tmp_path / "copy.safetensors"))
    sd, meta2 = load_weights(st)
    assert meta2["kind"] == "classifier" and meta2["class_names"] == list(CLASS_NAMES[:7])
    torch.testing.assert_close(sd["head.weight"], model.state_dict()["head.weight"])


def test_bad_inputs(tmp_path, capsys):
    enc = tmp_path / "enc.safetensors"
    make_weights(enc, kind="encoder")
    with pytest.raises(UserError, match="classifier"):
        export_weights(str(enc), "onnx")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    assert main(["export", "--weights", str(junk), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "junk.safetensors" in err[0]
    assert main(["export", "--weights", str(tmp_path / "missing.safetensors"), "--format", "onnx"]) == 2
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".tmp-*"))
