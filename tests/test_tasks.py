"""The three stage tasks on tiny models, and a tiny MAE that learns on real faces."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssfer_dist.data.facemix import facemix, facemix_loss
from ssfer_dist.models.classifier import build_classifier
from ssfer_dist.models.mae import build_mae
from ssfer_dist.ssl import EMATeacher, build_threshold
from ssfer_dist.tasks import FaceMixFinetune, MAEPretrain, SemiSupervised

IMG, PATCH, C = 32, 8, 7


def _clf(seed=0):
    torch.manual_seed(seed)
    m = build_classifier("micro", IMG, PATCH, num_classes=C, drop_path=0.0)
    with torch.no_grad():
        m.head.weight.normal_(0, 0.5)  # a head that is not ~0, so losses differ between samples
    return m


def _labeled(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, IMG, IMG, generator=g), "label": torch.randint(0, C, (n,), generator=g),
            "box": torch.tensor([[0, 0, 16, 16], [8, 8, 32, 32], [4, 4, 28, 28], [0, 0, 32, 32.]])[:n]}


def test_mae_task_uint8_and_seeded_noise():
    torch.manual_seed(0)
    m = build_mae("micro", IMG, PATCH, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    task = MAEPretrain(m, mask_ratio=0.75, noise_seed=7)
    x = torch.randint(0, 256, (2, 3, IMG, IMG), dtype=torch.uint8)
    a, b, c = task({"image": x}, 3), task({"image": x}, 3), task({"image": x}, 4)
    assert a["loss"].item() == b["loss"].item() != c["loss"].item()
    assert a["mask_ratio"] == 0.75
    a["loss"].backward()
    assert m.blocks[0].attn.qkv.weight.grad is not None


def test_facemix_task_equals_separate_forwards():
    model = _clf().eval()
    batch = _labeled()
    before = {k: v.clone() for k, v in batch.items()}
    task = FaceMixFinetune(model, C, alpha=1.0, pairing="reverse", smoothing=0.1, seed=3)
    out = task(batch, step=11)
    assert all(torch.equal(before[k], batch[k]) for k in batch)
    # np.random.default_rng([3,0,11]) first decides facemix_prob (one draw), then lam: replay it
    rng = np.random.default_rng([3, 0, 11])
    rng.random()
    mix = facemix(batch["image"], batch["label"], batch["box"], C, 1.0, "reverse", 0.1, rng=rng)
    assert out["lam"] == mix.lam
    ref = facemix_loss(model(mix.images), model(batch["image"]), mix)
    torch.testing.assert_close(out["loss"], ref["loss"], atol=1e-5, rtol=1e-5)
    assert out["iou"] == pytest.approx(mix.iou.mean().item())
    out["loss"].backward()


def test_facemix_task_plain_mixup_and_real_share():
    """``real_term=False``: plain mixup — the loss is the mixed term alone (the baseline FaceMix is compared
    with); ``real_share`` = loss_real / (loss_mix + loss_real) either way."""
    model = _clf().eval()
    batch = _labeled()
    fm = FaceMixFinetune(model, C, smoothing=0.1, seed=3)(batch, step=11)
    mx = FaceMixFinetune(model, C, smoothing=0.1, seed=3, real_term=False)(batch, step=11)
    torch.testing.assert_close(mx["loss"], fm["loss_mix"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mx["loss_real"], fm["loss_real"], atol=1e-5, rtol=1e-5)
    assert fm["real_share"].item() == pytest.approx(fm["loss_real"].item() / fm["loss"].item(), rel=1e-5)
    assert 0.0 < fm["real_share"].item() < 1.0 and mx["acc"] == fm["acc"]
    mx["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_semi_supervised_task_loss_and_metrics():
    student = _clf(0)
    teacher = EMATeacher(_clf(1), decay=0.5)
    pol = build_threshold("fixed", C, tau=0.0)  # keep everything: L_u is the plain pseudo-label CE
    task = SemiSupervised(student.eval(), teacher, pol, C, lambda_u=5.0)
    batch = dict(_labeled(), u_weak=torch.randn(3, 3, IMG, IMG), u_strong=torch.randn(3, 3, IMG, IMG))
    with torch.no_grad():
        pseudo = teacher.module(batch["u_weak"]).argmax(-1)
    batch["u_label"] = torch.tensor([pseudo[0].item(), (pseudo[1].item() + 1) % C, -1])
    out = task(batch, 0)
    lx = F.cross_entropy(student(batch["image"]), batch["label"])
    lu = F.cross_entropy(student(batch["u_strong"]), pseudo)
    torch.testing.assert_close(out["loss"], lx + 5.0 * lu, atol=1e-5, rtol=1e-5)
    assert out["mask_rate"] == 1.0 and out["pseudo_acc"] == 0.5
    # a threshold nobody reaches: L_u = 0, mask rate 0
    task.threshold = build_threshold("fixed", C, tau=1.01)
    out = task(batch, 1)
    assert out["mask_rate"] == 0.0 and out["loss_u"] == 0.0
    torch.testing.assert_close(out["loss"], lx, atol=1e-5, rtol=1e-5)


def test_semi_supervised_dtm_two_views_and_after_step():
    student = _clf(0)
    teacher = EMATeacher(student, decay=0.5)
    pol = build_threshold("dtm", C)
    task = SemiSupervised(student, teacher, pol, C, lambda_u=1.0, round_steps=2)
    g = torch.Generator().manual_seed(5)
    batch = dict(_labeled(), u_weak=torch.randn(3, 3, IMG, IMG, generator=g),
                 u_weak2=torch.randn(3, 3, IMG, IMG, generator=g), u_strong=torch.randn(3, 3, IMG, IMG, generator=g))
    with torch.no_grad():
        avg = (F.softmax(teacher.module(batch["u_weak"]), -1) + F.softmax(teacher.module(batch["u_weak2"]), -1)) / 2
    torch.testing.assert_close(task.teacher_probs(batch), avg)
    # make the teacher right and confident on the labeled batch so DTM sees correct samples
    batch["label"] = teacher.module(batch["image"]).argmax(-1).detach()
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    t_before = copy.deepcopy(teacher.module.state_dict())
    for step in range(2):
        out = task(batch, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        assert task.after_step(step)["ema_decay"] == 0.5
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(teacher.module.state_dict()[w], t_before[w])
    assert pol._count.sum() == 0  # the round closed at step 1 and reset the accumulators
    st = task.state_dict()
    task.load_state_dict(st)


def test_tiny_mae_learns_on_real_faces():
    """Held-out masked-patch loss falls below the 'mean of the visible patches' baseline."""
    from skimage.data import lfw_subset

    torch.manual_seed(0)
    faces = torch.from_numpy(lfw_subset()).float()[:, None]          # [200, 1, 25, 25]
    x = F.interpolate(faces, size=IMG, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    train, held = x[:150], x[150:]
    model = build_mae("micro", IMG, PATCH, decoder_dim=64, decoder_depth=1, decoder_heads=2)
    task = MAEPretrain(model, mask_ratio=0.75, noise_seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(len(held), (IMG // PATCH) ** 2, generator=g)

    def held_out():
        model.eval()
        with torch.no_grad():
            loss, _, mask = model(held, 0.75, noise)
            t = model.patchify(held)
            vis = (1 - mask).unsqueeze(-1)
            mean_vis = (t * vis).sum(1, keepdim=True) / vis.sum(1, keepdim=True)
            base = (((mean_vis - t) ** 2).mean(-1) * mask).sum() / mask.sum()
        model.train()
        return loss.item(), base.item()

    loss0, baseline = held_out()
    assert loss0 > baseline  # untrained: worse than the baseline
    for step in range(250):
        idx = torch.randint(0, len(train), (32,), generator=g)
        out = task({"image": train[idx]}, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    loss, _ = held_out()
    assert loss < 0.9 * baseline, (loss, baseline)
