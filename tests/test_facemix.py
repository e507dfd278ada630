"""FaceMix: IoU weights, purity, seeding, and the loss against torch's own label-smoothed CE."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssfer_dist.data.facemix import box_iou_pairs, facemix, facemix_loss, smooth_one_hot


def _batch(n=4, boxes=None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.tensor([0, 1, 2, 3][:n])
    b = boxes if boxes is not None else torch.tensor([[0, 0, 4, 4], [4, 4, 8, 8], [0, 0, 8, 8], [2, 2, 6, 6.]])[:n]
    return x, y, b


def test_box_iou_worked_values():
    a = torch.tensor([[0, 0, 4, 4], [0, 0, 4, 4], [0, 0, 4, 4], [0, 0, 0, 0.]])
    b = torch.tensor([[0, 0, 4, 4], [4, 4, 8, 8], [2, 0, 6, 4], [0, 0, 0, 0.]])
    torch.testing.assert_close(box_iou_pairs(a, b), torch.tensor([1.0, 0.0, 8 / 24, 0.0]))


def test_identical_boxes_give_real_weight_zero():
    box = torch.tensor([[10, 12, 40, 50.]]).repeat(4, 1)
    x, y, b = _batch(boxes=box)
    mix = facemix(x, y, b, num_classes=7, rng=0)
    torch.testing.assert_close(mix.real_weight, torch.zeros(4))
    logits = torch.randn(8, 7)
    assert facemix_loss(logits[:4], logits[4:], mix)["loss_real"].item() == 0.0


def test_disjoint_boxes_give_real_weight_one():
    box = torch.tensor([[0, 0, 4, 4], [5, 5, 8, 8], [0, 5, 3, 8], [5, 0, 8, 3.]])
    x, y, b = _batch(boxes=box)  # reversed pairs (0,3) (1,2) are disjoint
    mix = facemix(x, y, b, num_classes=7, rng=0)
    torch.testing.assert_close(mix.real_weight, torch.ones(4))


def test_inputs_unchanged_and_mix_formula():
    x, y, b = _batch()
    x0, y0, b0 = x.clone(), y.clone(), b.clone()
    mix = facemix(x, y, b, num_classes=7, alpha=1.0, pairing="reverse", smoothing=0.1, rng=3)
    assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(b, b0)
    assert torch.equal(mix.index, torch.tensor([3, 2, 1, 0]))
    lam = mix.lam
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(mix.images, lam * x + (1 - lam) * x.flip(0))
    oh = F.one_hot(y, 7).float() * 0.9 + 0.1 / 7
    torch.testing.assert_close(mix.targets, lam * oh + (1 - lam) * oh.flip(0))
    torch.testing.assert_close(mix.targets.sum(-1), torch.ones(4))
    assert mix.images.data_ptr() != x.data_ptr()


def test_seeded_and_random_pairing():
    x, y, b = _batch()
    m1 = facemix(x, y, b, 7, pairing="random", rng=11)
    m2 = facemix(x, y, b, 7, pairing="random", rng=11)
    assert m1.lam == m2.lam and torch.equal(m1.index, m2.index) and torch.equal(m1.images, m2.images)
    assert sorted(m1.index.tolist()) == [0, 1, 2, 3]
    lams = {facemix(x, y, b, 7, rng=s).lam for s in range(20)}
    assert len(lams) == 20
    with pytest.raises(ValueError):
        facemix(x, y, b, 7, pairing="shuffle")


def test_smooth_one_hot_matches_torch_label_smoothing():
    logits, y = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    t = smooth_one_hot(y, 7, 0.1)
    ours = -(t * F.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(ours, F.cross_entropy(logits, y, label_smoothing=0.1, reduction="none"))


def test_loss_worked_example():
    """Smoothing reaches the mixed targets; the real-image term uses the hard labels (SSFER's fine-tune.py)."""
    x, y, b = _batch()
    mix = facemix(x, y, b, num_classes=7, smoothing=0.1, rng=5)
    g = torch.Generator().manual_seed(2)
    zm, zr = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    out = facemix_loss(zm, zr, mix)
    lam, j = mix.lam, mix.index
    ce = lambda z, t: F.cross_entropy(z, t, label_smoothing=0.1, reduction="none")  # noqa: E731
    hard = lambda z, t: F.cross_entropy(z, t, reduction="none")  # noqa: E731
    # mixed target CE is linear in the target: lam CE(z, y_i) + (1 - lam) CE(z, y_j)
    l_mix = (lam * ce(zm, y) + (1 - lam) * ce(zm, y[j])).mean()
    iou = box_iou_pairs(b, b[j])
    l_real = ((1 - iou) * (hard(zr, y) + hard(zr[j], y[j]))).mean()
    assert torch.equal(mix.real_targets, F.one_hot(y, 7).float())
    torch.testing.assert_close(out["loss_mix"], l_mix)
    torch.testing.assert_close(out["loss_real"], l_real)
    torch.testing.assert_close(out["loss"], l_mix + l_real)
    # smooth_real: the option that smooths both terms
    both = facemix(x, y, b, num_classes=7, smoothing=0.1, rng=5, smooth_real=True)
    assert both.lam == lam and torch.equal(both.targets, mix.targets)
    out_b = facemix_loss(zm, zr, both)
    torch.testing.assert_close(out_b["loss_real"], ((1 - iou) * (ce(zr, y) + ce(zr[j], y[j]))).mean())
    assert not torch.allclose(out_b["loss_real"], out["loss_real"])


def test_facemix_task_real_term_hard_unless_smooth_real():
    """The task wires ``smooth_real`` through: same step, same model -> the real term differs only by smoothing."""
    from ssfer_dist.tasks import FaceMixFinetune

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 7))
    x, y, b = _batch()
    batch = {"image": x, "label": y, "box": b}
    hard = FaceMixFinetune(model, 7, smoothing=0.1, seed=1)(batch, 3)
    soft = FaceMixFinetune(model, 7, smoothing=0.1, seed=1, smooth_real=True)(batch, 3)
    torch.testing.assert_close(hard["loss_mix"], soft["loss_mix"])
    assert not torch.allclose(hard["loss_real"], soft["loss_real"])
