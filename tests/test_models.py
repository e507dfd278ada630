"""MAE / ViT / classifier / weights I/O (CPU, tiny models)."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from ssfer_dist.errors import UserError
from ssfer_dist.models.classifier import build_classifier, param_groups
from ssfer_dist.models.io import classifier_from_weights, load_weights, save_weights
from ssfer_dist.models.mae import build_mae, convert_mae_checkpoint, import_mae_checkpoint
from ssfer_dist.models.vit import build_vit

IMG, PATCH = 32, 8
L = (IMG // PATCH) ** 2


def tiny_mae(norm_pix=False, img=IMG):
    torch.manual_seed(0)
    return build_mae("micro", img, PATCH, norm_pix_loss=norm_pix, decoder_dim=32, decoder_depth=2, decoder_heads=2)


# ---------------------------------------------------------------- a reference MAE from the published equations
def _ln(x, sd, k):
    return F.layer_norm(x, x.shape[-1:], sd[k + ".weight"], sd[k + ".bias"], eps=1e-6)


def _block(x, sd, k, heads):
    n, t, d = x.shape
    h = _ln(x, sd, k + ".norm1")
    qkv = h @ sd[k + ".attn.qkv.weight"].T + sd[k + ".attn.qkv.bias"]
    q, kk, v = qkv.view(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    o = (a @ v).transpose(1, 2).reshape(n, t, d)
    x = x + o @ sd[k + ".attn.proj.weight"].T + sd[k + ".attn.proj.bias"]
    h = _ln(x, sd, k + ".norm2")
    h = h @ sd[k + ".mlp.fc1.weight"].T + sd[k + ".mlp.fc1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + h @ sd[k + ".mlp.fc2.weight"].T + sd[k + ".mlp.fc2.bias"]


def reference_mae(sd, imgs, noise, mask_ratio, p, enc_heads, dec_heads, norm_pix):
    """MAE forward written from the paper / models_mae.py equations, on a raw state dict."""
    n, c, hh, ww = imgs.shape
    gh, gw = hh // p, ww // p
    length = gh * gw
    # patches in (c, p, q) order for the conv-as-linear embedding
    pc = imgs.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, length, c * p * p)
    w = sd["patch_embed.proj.weight"]
    x = pc @ w.reshape(w.shape[0], -1).T + sd["patch_embed.proj.bias"]
    x = x + sd["pos_embed"][:, 1:]
    keep = int(length * (1 - mask_ratio))
    order = torch.argsort(noise, dim=1)
    restore = torch.argsort(order, dim=1)
    x = torch.stack([x[i, order[i, :keep]] for i in range(n)])
    mask = torch.ones(n, length)
    for i in range(n):
        mask[i, order[i, :keep]] = 0
    x = torch.cat([(sd["cls_token"] + sd["pos_embed"][:, :1]).expand(n, -1, -1), x], 1)
    nb = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for b in range(nb):
        x = _block(x, sd, f"blocks.{b}", enc_heads)
    x = _ln(x, sd, "norm")
    x = x @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
    full = sd["mask_token"].expand(n, length, -1).clone()
    for i in range(n):
        full[i, order[i, :keep]] = x[i, 1:]
    assert torch.equal(order.gather(1, restore), torch.arange(length).expand(n, -1))
    x = torch.cat([x[:, :1], full], 1) + sd["decoder_pos_embed"]
    nd = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
    for b in range(nd):
        x = _block(x, sd, f"decoder_blocks.{b}", dec_heads)
    x = _ln(x, sd, "decoder_norm")
    pred = (x @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"])[:, 1:]
    target = imgs.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(n, length, p * p * c)
    if norm_pix:
        mu = target.mean(-1, keepdim=True)
        var = ((target - mu) ** 2).sum(-1, keepdim=True) / (target.shape[-1] - 1)
        target = (target - mu) / torch.sqrt(var + 1e-6)
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum(), pred, mask


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_equals_reference_from_equations(norm_pix):
    m = tiny_mae(norm_pix)
    # perturb the zero-initialised biases so every term matters
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    imgs = torch.randn(3, 3, IMG, IMG)
    noise = torch.rand(3, L)
    loss, pred, mask = m(imgs, mask_ratio=0.75, noise=noise)
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    rl, rp, rm = reference_mae(sd, imgs, noise, 0.75, PATCH, 2, 2, norm_pix)
    assert torch.equal(mask, rm)
    torch.testing.assert_close(pred, rp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, rl, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.6])
def test_masking_keeps_int_count_and_restore_inverts(ratio):
    m = tiny_mae()
    x = torch.randn(4, L, 5)
    noise = torch.rand(4, L)
    kept, mask, restore = m.random_masking(x, ratio, noise)
    keep = int(L * (1 - ratio))
    assert kept.shape == (4, keep, 5)
    assert (mask.sum(1) == L - keep).all()
    shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(shuffle, 1, restore), torch.arange(L).expand(4, -1))
    assert torch.equal(torch.gather(restore, 1, shuffle), torch.arange(L).expand(4, -1))
    # kept tokens are exactly the unmasked ones
    for i in range(4):
        assert torch.equal(kept[i], x[i][mask[i] == 0][torch.argsort(noise[i][mask[i] == 0])])


def test_loss_counts_masked_patches_only():
    m = tiny_mae()
    imgs = torch.randn(2, 3, IMG, IMG)
    noise = torch.rand(2, L)
    loss, pred, mask = m(imgs, 0.75, noise)
    target = m.patchify(imgs)
    # change the *visible* patches of the target image: the loss must not move
    imgs2 = m.unpatchify(torch.where(mask.bool().unsqueeze(-1), target, target + 5.0))
    latent_independent = m.forward_loss(imgs2, pred, mask)
    torch.testing.assert_close(latent_independent, loss)
    per = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(loss, per[mask.bool()].mean())


def test_patchify_roundtrip():
    m = tiny_mae()
    x = torch.randn(2, 3, IMG, IMG)
    assert torch.equal(m.unpatchify(m.patchify(x)), x)


def test_export_encoder_loads_strictly_into_timm():
    m = tiny_mae()
    enc = m.export_encoder()
    v = build_vit("micro", IMG, PATCH, num_classes=0)
    v.load_state_dict(enc, strict=True)
    x = torch.randn(2, 3, IMG, IMG)
    # all patches kept (mask ratio 0, identity order) -> the encoder's cls token equals timm's
    latent, _, _ = m.forward_encoder(x, 0.0, torch.arange(L).float().expand(2, -1))
    torch.testing.assert_close(v.eval().forward_features(x), latent, atol=1e-5, rtol=1e-5)
    # at another image size the position embedding is interpolated and still loads strictly
    enc48 = m.export_encoder(img_size=48)
    assert enc48["pos_embed"].shape == (1, 1 + 36, 64)
    build_vit("micro", 48, PATCH, num_classes=0).load_state_dict(enc48, strict=True)


def test_official_checkpoint_roundtrip(tmp_path):
    m = tiny_mae()
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": m.state_dict(), "epoch": 799, "args": argparse.Namespace(mask_ratio=0.75)}, path)
    m2 = import_mae_checkpoint(str(path), decoder_heads=2)
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k
    imgs, noise = torch.randn(2, 3, IMG, IMG), torch.rand(2, L)
    torch.testing.assert_close(m2(imgs, 0.75, noise)[0], m(imgs, 0.75, noise)[0])
    # 'module.'-prefixed (DDP) keys are accepted too
    torch.save({"model": {"module." + k: v for k, v in m.state_dict().items()}}, path)
    assert torch.equal(import_mae_checkpoint(str(path), decoder_heads=2).cls_token, m.cls_token)
    # a different image size: both position embeddings are interpolated
    m48 = import_mae_checkpoint(str(path), img_size=48, decoder_heads=2)
    assert m48.pos_embed.shape == (1, 37, 64) and m48.decoder_pos_embed.shape == (1, 37, 32)
    loss, pred, mask = m48(torch.randn(1, 3, 48, 48))
    assert pred.shape == (1, 36, PATCH * PATCH * 3) and torch.isfinite(loss)
    build_vit("micro", 48, PATCH).load_state_dict(m48.export_encoder(), strict=False)


class Evil:  # arbitrary pickled objects are refused (weights_only=True)
    pass


def test_convert_official_checkpoint_to_weights_file(tmp_path):
    m = tiny_mae()
    pth = tmp_path / "mae.pth"
    torch.save({"model": m.state_dict()}, pth)
    enc = str(tmp_path / "enc.safetensors")
    meta = convert_mae_checkpoint(str(pth), enc, kind="encoder", decoder_heads=2)
    assert meta["kind"] == "encoder" and meta["arch"]["size"] == "micro"
    clf, _ = classifier_from_weights(enc, num_classes=7)
    assert torch.equal(clf.blocks[0].attn.qkv.weight, m.blocks[0].attn.qkv.weight)
    full = str(tmp_path / "mae.safetensors")
    convert_mae_checkpoint(str(pth), full, kind="mae", decoder_heads=2)
    sd, meta = load_weights(full)
    assert meta["kind"] == "mae" and meta["arch"]["decoder_heads"] == 2
    m2 = build_mae("micro", IMG, PATCH, decoder_dim=32, decoder_depth=2, decoder_heads=2)
    m2.load_state_dict(sd, strict=True)


def test_import_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        import_mae_checkpoint(str(tmp_path / "nope.pth"))
    bad = tmp_path / "enc.pth"
    torch.save({"model": tiny_mae().export_encoder()}, bad)
    with pytest.raises(UserError, match="mask_token"):
        import_mae_checkpoint(str(bad))

    evil = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, evil)
    with pytest.raises(UserError, match="not a loadable"):
        import_mae_checkpoint(str(evil))


def test_weights_io_and_classifier_from_weights(tmp_path):
    m = tiny_mae()
    arch = {"size": "micro", "img_size": IMG, "patch_size": PATCH}
    enc_path = str(tmp_path / "enc.safetensors")
    save_weights(enc_path, m.export_encoder(), {"kind": "encoder", "arch": arch})
    sd, meta = load_weights(enc_path)
    assert meta == {"kind": "encoder", "arch": arch}
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], m.blocks[0].attn.qkv.weight)

    clf, cmeta = classifier_from_weights(enc_path, num_classes=7)
    assert cmeta["kind"] == "classifier" and cmeta["arch"]["num_classes"] == 7
    assert len(cmeta["class_names"]) == 7
    assert torch.equal(clf.patch_embed.proj.weight, m.patch_embed.proj.weight)
    assert torch.equal(clf.norm.weight, m.norm.weight)
    assert clf(torch.randn(2, 3, IMG, IMG)).shape == (2, 7)
    clf_avg, _ = classifier_from_weights(enc_path, num_classes=8, global_pool="avg")
    assert torch.equal(clf_avg.blocks[1].mlp.fc2.weight, m.blocks[1].mlp.fc2.weight)

    full_path = str(tmp_path / "clf.safetensors")
    save_weights(full_path, clf.state_dict(), cmeta)
    clf2, meta2 = classifier_from_weights(full_path)
    x = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(clf2.eval()(x), clf.eval()(x))
    with pytest.raises(UserError, match="7 classes, 8 were asked"):
        classifier_from_weights(full_path, num_classes=8)
    with pytest.raises(UserError, match="pass num_classes"):
        classifier_from_weights(enc_path)
    # an MAE file works like an encoder file
    mae_path = str(tmp_path / "mae.safetensors")
    save_weights(mae_path, m.state_dict(), {"kind": "mae", "arch": arch})
    assert classifier_from_weights(mae_path, num_classes=7)[0].head.out_features == 7
    # wrong image size for these weights -> UserError
    save_weights(enc_path, m.export_encoder(), {"kind": "encoder", "arch": dict(arch, img_size=48)})
    with pytest.raises(UserError, match="shape mismatch"):
        classifier_from_weights(enc_path, num_classes=7)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="junk.safetensors"):
        load_weights(str(junk))
    with pytest.raises(UserError, match="kind"):
        save_weights(str(tmp_path / "x.safetensors"), {}, {"kind": "other", "arch": arch})


def test_param_groups_layer_decay_and_no_decay():
    clf = build_classifier("micro", IMG, PATCH, num_classes=7, drop_path=0.1)
    groups = param_groups(clf, weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(clf.named_parameters())
    assert len(by_param) == len(named)  # every trainable parameter exactly once
    num_layers = len(clf.blocks) + 1  # 3
    assert by_param[id(named["pos_embed"])]["weight_decay"] == 0.0
    assert by_param[id(named["cls_token"])]["weight_decay"] == 0.0
    assert by_param[id(named["blocks.0.norm1.weight"])]["weight_decay"] == 0.0
    assert by_param[id(named["blocks.0.attn.qkv.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05
    assert by_param[id(named["patch_embed.proj.weight"])]["lr_scale"] == 0.5 ** num_layers
    assert by_param[id(named["blocks.1.mlp.fc1.weight"])]["lr_scale"] == 0.5 ** (num_layers - 2)
    assert by_param[id(named["head.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["norm.weight"])]["lr_scale"] == 0.5   # timm: final norm with the last block
    # a torch optimizer takes them as they are
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    assert len(opt.param_groups) == len(groups)
    # MAE: the fixed sin-cos position embeddings are frozen and left out
    mae = tiny_mae()
    mg = param_groups(mae, 0.05, 1.0)
    ids = {id(p) for g in mg for p in g["params"]}
    assert id(mae.pos_embed) not in ids and id(mae.decoder_pos_embed) not in ids
    assert {id(mae.mask_token)} <= {id(p) for g in mg if g["weight_decay"] == 0 for p in g["params"]}


@pytest.mark.parametrize("size,millions", [("tiny", 5.52), ("small", 21.67), ("base", 85.80), ("large", 303.30)])
def test_vit_sizes_match_timm_reference_counts(size, millions):
    with torch.device("meta"):  # no memory, no init cost
        v = build_vit(size, 224, 16)
    assert sum(p.numel() for p in v.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)


def test_mae_base_matches_official_parameter_count():
    with torch.device("meta"):
        m = build_mae("base", 224, 16)
    # facebookresearch/mae mae_vit_base_patch16_dec512d8b: 111.91 M parameters (incl. fixed pos-embeds)
    assert sum(p.numel() for p in m.parameters()) / 1e6 == pytest.approx(111.91, abs=0.01)
    with torch.device("meta"):
        m112 = build_mae("base", 112, 16)
    assert m112.pos_embed.shape == (1, 50, 768)
    with pytest.raises(UserError):
        build_vit("gigantic")
