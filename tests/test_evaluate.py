"""ssfer evaluate: metrics on a hand-checked confusion matrix; end to end on real shards (single process
and Ray tasks agree with predictions computed here independently); bad inputs."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ssfer_dist.cli import main
from ssfer_dist.errors import UserError
from ssfer_dist.evaluate import confusion_metrics, evaluate_shards
from tests.test_export import make_weights


def test_metrics_hand_checked():
    # rows = true, cols = predicted
    conf = np.array([[5, 1, 0],
                     [2, 3, 1],
                     [0, 0, 0]])
    m = confusion_metrics(conf, ["a", "b", "c"])
    assert m["num_samples"] == 12
    assert m["accuracy"] == pytest.approx(8 / 12)
    # recall a = 5/6, b = 3/6; precision a = 5/7, b = 3/4, c = 0/1 (predicted once, never right)
    pa, ra = 5 / 7, 5 / 6
    pb, rb = 3 / 4, 3 / 6
    f1 = 2 * pa * ra / (pa + ra)
    assert m["per_class"]["a"] == pytest.approx({"precision": pa, "recall": ra, "f1": f1, "support": 6})
    assert m["per_class"]["b"]["f1"] == pytest.approx(2 * pb * rb / (pb + rb))
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # class c has no support: left out of the class means
    assert m["mean_class_accuracy"] == pytest.approx((ra + rb) / 2)
    assert m["macro_f1"] == pytest.approx((2 * pa * ra / (pa + ra) + 2 * pb * rb / (pb + rb)) / 2)


@pytest.fixture(scope="module")
def rafdb_shards(tmp_path_factory):
    from sharding.build import BuildConfig, run_build
    from ssfer_dist import synth

    root = tmp_path_factory.mktemp("evaldata")
    synth.write_rafdb(str(root / "raf"), 1, 6, seed=2, image_size=48)
    out = str(root / "shards")
    run_build(BuildConfig(format="rafdb", input=str(root / "raf"), output=out, split="test", image_size=32,
                          samples_per_shard=16, progress=False))
    return root, out


def _independent_confusion(model, shards):
    import webdataset as wds

    from ssfer_dist.shards.manifest import read_manifest

    urls = read_manifest(shards).shard_urls()
    conf = np.zeros((7, 7), np.int64)
    mean = torch.tensor([0.588, 0.459, 0.402]).view(1, 3, 1, 1)
    std = torch.tensor([0.228, 0.202, 0.190]).view(1, 3, 1, 1)
    for s in wds.WebDataset(urls, shardshuffle=False):
        img = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
        x = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)[None]
        with torch.no_grad():
            p = int(model((x - mean) / std).argmax(1))
        conf[int(s["cls"]), p] += 1
    return conf


def test_evaluate_end_to_end(rafdb_shards, capsys):
    root, shards = rafdb_shards
    w = root / "model.safetensors"
    model = make_weights(w, seed=3)
    want = _independent_confusion(model, shards)
    assert want.sum() == 42
    out = root / "report"
    assert main(["evaluate", "--weights", str(w), "--shards", shards, "--out", str(out), "--batch-size", "5"]) == 0
    printed = capsys.readouterr().out
    assert "mean class accuracy" in printed and "happiness" in printed
    m = json.load(open(out / "metrics.json"))
    assert np.array_equal(np.array(m["confusion"]), want)
    assert m["accuracy"] == pytest.approx(np.trace(want) / want.sum())
    assert json.load(open(out / "confusion.json"))["confusion"] == want.tolist()
    with Image.open(out / "confusion.png") as im:
        assert im.size[0] > 300 and im.size[1] > 300


@pytest.mark.slow
def test_evaluate_as_ray_tasks_matches(rafdb_shards, ray_local):
    root, shards = rafdb_shards
    w = root / "model_ray.safetensors"
    make_weights(w, seed=4)
    single = evaluate_shards(str(w), shards, batch_size=8)
    distributed = evaluate_shards(str(w), shards, batch_size=8, use_ray=True)
    assert distributed["confusion"] == single["confusion"]
    assert distributed["num_samples"] == 42


def test_bad_inputs(rafdb_shards, tmp_path, capsys):
    _, shards = rafdb_shards
    w8 = tmp_path / "eight.safetensors"
    make_weights(w8, num_classes=8)
    with pytest.raises(UserError, match="8 classes"):
        evaluate_shards(str(w8), shards)
    w7 = tmp_path / "seven.safetensors"
    make_weights(w7)
    empty = tmp_path / "no_manifest"
    empty.mkdir()
    assert main(["evaluate", "--weights", str(w7), "--shards", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_manifest" in err[0]
    enc = tmp_path / "enc.safetensors"
    make_weights(enc, kind="encoder")
    with pytest.raises(UserError, match="classifier"):
        evaluate_shards(str(enc), shards)
