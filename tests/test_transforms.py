"""Transforms: the face box follows crops, flips and resizes; uint8 mode == float mode after device normalisation."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from ssfer_dist.shards.schema import FACE_MEAN, FACE_STD
from ssfer_dist.data.transforms import build_transform, normalize_on_device, to_tensor


def _rect_image(w=96, h=80, box=(20, 30, 60, 70)):
    a = np.zeros((h, w, 3), np.uint8)
    a[box[1]:box[3], box[0]:box[2]] = 255
    return Image.fromarray(a), np.array(box, np.float32)


def _bright_bbox(t: torch.Tensor):
    m = t.float().mean(0) > 127
    ys, xs = torch.nonzero(m, as_tuple=True)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize("kind", ["mae", "weak", "eval"])
def test_box_follows_geometry(kind):
    random.seed(0)
    tf = build_transform(kind, 64, uint8=True)
    img, box = _rect_image()
    checked = 0
    for _ in range(25):
        t, b = tf(img, box)
        assert t.shape == (3, 64, 64) and t.dtype == torch.uint8 and b.dtype == np.float32
        assert (b >= 0).all() and (b <= 64).all() and b[2] >= b[0] and b[3] >= b[1]
        if (b[2] - b[0]) > 6 and (b[3] - b[1]) > 6:
            np.testing.assert_allclose(_bright_bbox(t), b, atol=2.0)
            checked += 1
    assert checked >= 10


def test_flip_moves_box():
    random.seed(1)
    tf = build_transform("weak", 64, uint8=True)
    tf.scale = (1.0, 1.0)
    img, box = _rect_image(64, 64, (4, 10, 20, 50))
    seen = set()
    for _ in range(20):
        t, b = tf(img, box)
        seen.add(round(float(b[0])))
        np.testing.assert_allclose(_bright_bbox(t), b, atol=2.0)
    assert seen == {4, 44}


def test_none_box_is_whole_image_and_strong_runs():
    random.seed(2)
    img, _ = _rect_image()
    t, b = build_transform("eval", 48)(img, None)
    np.testing.assert_allclose(b, [0, 0, 48, 48])
    assert t.dtype == torch.float32
    ts, bs = build_transform("strong", 48)(img, None)
    assert ts.shape == (3, 48, 48) and bs.shape == (4,)
    with pytest.raises(ValueError):
        build_transform("medium", 48)


def test_uint8_then_device_normalisation_matches_float():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    f = to_tensor(img)
    u = to_tensor(img, uint8=True)
    torch.testing.assert_close(normalize_on_device(u), f)
    batch = normalize_on_device(torch.stack([u, u]), None, None)
    torch.testing.assert_close(batch[1], f)
    expect = (np.asarray(img, np.float32)[0, 0] / 255 - np.array(FACE_MEAN)) / np.array(FACE_STD)
    np.testing.assert_allclose(f[:, 0, 0].numpy(), expect, rtol=1e-5)


def test_strong_transform_survives_the_largest_magnitude(monkeypatch):
    """RandAugment's magnitude noise reaches the clamp; every op must still work there (posterize used
    to ask Pillow for 0 bits and raise, silently dropping ~0.3 % of the samples as 'corrupt')."""
    import random

    import numpy as np
    from PIL import Image

    from ssfer_dist.data.transforms import build_transform

    tf = build_transform("strong", 32)
    ops = tf.randaug.ops
    monkeypatch.setattr(random, "gauss", lambda mu, sigma: 1e6)  # magnitude noise far past the clamp
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 32, 3), dtype=np.uint8))
    for op in ops:
        op.prob = 1.0
        out = op(img)
        assert out.size == img.size, op.name
