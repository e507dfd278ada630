"""MAE training-step throughput: ours (``ssfer_dist.models.mae``) vs a plain reference-style MAE, same run.

The reference is written here in the style of facebookresearch/mae ``models_mae.py`` (explicit
softmax attention, ``repeat``-based gathers); it gets *our* weights, so both compute the same loss
(checked). Steps are interleaved (ours, reference, ours, ...) so machine load affects both alike.
FLOPs per image come from ``torch.utils.flop_counter`` on one forward+backward of the reference.

    python benchmarks/mae_step.py --sizes small --batch 8 --steps 4
    python benchmarks/mae_step.py --sizes small,base --batch 16 --steps 10 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import results  # noqa: E402  (benchmarks/results.py: this folder is sys.path[0] for a script)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ssfer_dist.models.mae import build_mae  # noqa: E402
from ssfer_dist.models.vit import vit_dims  # noqa: E402


# ----------------------------------------------------------------------------- reference-style MAE
class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class RefMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), RefAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), RefMlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, p, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=p, stride=p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RefMAE(nn.Module):
    def __init__(self, img, p, dim, depth, heads, ddim, ddepth, dheads):
        super().__init__()
        n = (img // p) ** 2
        self.p = p
        self.patch_embed = RefPatchEmbed(p, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList([RefBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, ddim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([RefBlock(ddim, dheads) for _ in range(ddepth)])
        self.decoder_norm = nn.LayerNorm(ddim, eps=1e-6)
        self.decoder_pred = nn.Linear(ddim, p * p * 3)

    def patchify(self, imgs):
        p = self.p
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p ** 2 * 3)

    def random_masking(self, x, mask_ratio, noise):
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        target = self.patchify(imgs)
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum(), pred, mask


# ----------------------------------------------------------------------------- benchmark
def flops_per_image(model, img, dtype):
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, img, img, dtype=dtype)
    noise = torch.rand(2, (img // model.p) ** 2)
    with FlopCounterMode(display=False) as fc:
        loss, _, _ = model(x, 0.75, noise)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 2


def bench_size(size, args):
    dim, depth, heads = vit_dims(size)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    ours = build_mae(size, args.img, args.patch).to(dtype)
    ref = RefMAE(args.img, args.patch, dim, depth, heads, 512, 8, 16).to(dtype)
    ref.load_state_dict(ours.state_dict(), strict=True)
    L = (args.img // args.patch) ** 2
    x = torch.randn(args.batch, 3, args.img, args.img, dtype=dtype)
    noise = torch.rand(args.batch, L)
    with torch.no_grad():
        lo, lr_ = ours(x, 0.75, noise)[0].item(), ref(x, 0.75, noise)[0].item()
    assert math.isclose(lo, lr_, rel_tol=1e-2 if dtype != torch.float32 else 1e-4), (lo, lr_)
    fpi = flops_per_image(ref, args.img, dtype)
    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
            for name, m in (("ours", ours), ("ref", ref))}
    models = {"ours": ours, "ref": ref}

    def step(name):
        m, opt = models[name], opts[name]
        loss, _, _ = m(x, 0.75, torch.rand(args.batch, L))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step("ours")
        step("ref")
    times = {"ours": [], "ref": []}
    for i in range(args.steps):
        for name in (("ours", "ref") if i % 2 == 0 else ("ref", "ours")):
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
    res = {"size": size, "img": args.img, "batch": args.batch, "dtype": args.dtype, "threads": torch.get_num_threads(),
           "flops_per_image_fwd_bwd": fpi, "gflops_per_image": fpi / 1e9}
    for name in times:
        med = sorted(times[name])[len(times[name]) // 2]
        res[f"{name}_s_per_step"] = med
        res[f"{name}_s_per_step_min"] = min(times[name])
        res[f"{name}_img_per_s"] = args.batch / med
        res[f"{name}_gflop_per_s"] = fpi * args.batch / med / 1e9
    res["ratio_ours_over_ref"] = res["ours_img_per_s"] / res["ref_img_per_s"]
    res["ratio_ours_over_ref_min"] = res["ref_s_per_step_min"] / res["ours_s_per_step_min"]
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small", help="comma list: tiny,small,base,large")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per implementation (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for size in args.sizes.split(","):
        r = bench_size(size.strip(), args)
        results.record(f"mae_step_{size.strip()}_{args.img}px_{args.dtype}", results.command_line(argv),
                       {"reference-style MAE": {"min": args.batch / r["ref_s_per_step_min"],
                                                "median": r["ref_img_per_s"]},
                        "ours": {"min": args.batch / r["ours_s_per_step_min"], "median": r["ours_img_per_s"]}},
                       unit="img/s (min: from the fastest step)", baseline="reference-style MAE",
                       note=f"batch {args.batch}, {args.steps} timed steps each, interleaved", extra=r)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"MAE ViT-{size}/{args.patch} @{args.img}px batch {args.batch} {args.dtype} "
                  f"threads {r['threads']}: {r['gflops_per_image']:.1f} GFLOP/img (fwd+bwd)\n"
                  f"  ours {r['ours_img_per_s']:.2f} img/s ({r['ours_s_per_step']:.3f} s/step, "
                  f"{r['ours_gflop_per_s']:.1f} GFLOP/s)\n"
                  f"  ref  {r['ref_img_per_s']:.2f} img/s ({r['ref_s_per_step']:.3f} s/step, "
                  f"{r['ref_gflop_per_s']:.1f} GFLOP/s)\n"
                  f"  ratio ours/ref = {r['ratio_ours_over_ref']:.3f}x (medians; "
                  f"{r['ratio_ours_over_ref_min']:.3f}x on the fastest step of each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
