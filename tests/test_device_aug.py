"""Geometric augmentation on the device: torchvision's crop distribution, exact boxes, resume, decode-only
loader views (uint8 or JPEG bytes), mixed-size shards, and the three tasks training through the device path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ssfer_dist.data.device_aug import (
    CropParams,
    DeviceAugment,
    crop_flip_resize,
    decode_jpegs,
    map_boxes,
    place_views,
    sample_crops,
)
from ssfer_dist.shards.manifest import read_manifest
from ssfer_dist.data.pipeline import ShardStream, Source, StreamSpec, View, draft_decoded_size, make_loader
from ssfer_dist.data.transforms import crop_box, flip_box
from ssfer_dist.train.debugdata import face_images, write_debug_shards, write_shard_folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_debug_shards(str(tmp_path_factory.mktemp("devaug")), num_fr=64, num_fer=96, num_test=14)


# ---------------------------------------------------------------- crop parameters


def _torchvision_draws(n, height, width, scale, ratio, seed):
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(seed)
    img = torch.empty(3, height, width)
    return np.array([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


@pytest.mark.parametrize("height,width,scale,ratio", [
    (112, 112, (0.2, 1.0), (3 / 4, 4 / 3)),       # the MAE / weak setting
    (60, 100, (0.08, 1.0), (3 / 4, 4 / 3)),       # non-square, torchvision's default scale
    (40, 40, (0.9, 1.0), (1.6, 2.5)),             # mostly no try fits: the centre-crop fallback
])
def test_crop_distribution_matches_torchvision(height, width, scale, ratio):
    """Two-sample KS test per parameter (top, left, h, w, area) between our batched draws and
    torchvision's ``RandomResizedCrop.get_params``; fixed seeds, so the verdict is deterministic."""
    from scipy.stats import ks_2samp

    n = 3000
    ref = _torchvision_draws(n, height, width, scale, ratio, seed=0)
    p = sample_crops(n, height, width, scale, ratio, generator=torch.Generator().manual_seed(1))
    ours = np.stack([p.top.numpy(), p.left.numpy(), p.h.numpy(), p.w.numpy()], axis=1)
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    assert (ours >= 0).all() and (ours[:, 2:] > 0).all()
    for j, name in enumerate(("top", "left", "h", "w")):
        assert ks_2samp(ref[:, j], ours[:, j]).pvalue > 1e-3, name
    assert ks_2samp(ref[:, 2] * ref[:, 3], ours[:, 2] * ours[:, 3]).pvalue > 1e-3
    # the same test tells a different rule apart (e.g. scale 0.08-1 instead of 0.2-1)
    if scale == (0.2, 1.0):
        other = sample_crops(n, height, width, (0.08, 1.0), ratio, generator=torch.Generator().manual_seed(1))
        assert ks_2samp(ref[:, 2] * ref[:, 3], (other.h * other.w).numpy()).pvalue < 1e-6
    flips = sample_crops(n, height, width, scale, ratio, generator=torch.Generator().manual_seed(2)).flip
    assert abs(flips.float().mean().item() - 0.5) < 0.05


def test_fallback_is_torchvisions_centre_crop():
    p = sample_crops(64, 40, 100, scale=(0.99, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    # no square of 99 % of a 40x100 area fits: the centre crop with the ratio's bound (w = round(40 * 1))
    assert set(p.w.tolist()) == {40} and set(p.h.tolist()) == {40}
    assert set(p.top.tolist()) == {0} and set(p.left.tolist()) == {30}


# ---------------------------------------------------------------- images and boxes


def _params(top, left, h, w, flip):
    t = lambda v: torch.tensor(v, dtype=torch.long)   # noqa: E731
    return CropParams(t(top), t(left), t(h), t(w), torch.tensor(flip, dtype=torch.bool))


def test_boxes_follow_crop_flip_resize_exactly_as_the_cpu_path():
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [0.0, 0.0, 112.0, 112.0], [50.5, 3.25, 111.0, 40.0],
                          [5.0, 5.0, 30.0, 30.0]])
    p = _params([10, 0, 33, 0], [7, 0, 2, 40], [80, 112, 60, 50], [64, 112, 90, 50], [False, True, True, False])
    got = map_boxes(boxes, p, 224)
    for i in range(4):
        top, left, h, w = (int(v[i]) for v in (p.top, p.left, p.h, p.w))
        ref = crop_box(boxes[i].numpy(), top, left, h, w, 224, 224)
        if p.flip[i]:
            ref = flip_box(ref, 224)
        np.testing.assert_array_equal(got[i].numpy(), ref)     # exact, not close


def test_identity_crop_and_flip_are_exact():
    x = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    p = _params([0, 0], [0, 0], [24, 24], [24, 24], [False, True])
    for mode in ("bicubic", "bilinear"):
        y = crop_flip_resize(x, p, 24, mode)
        assert torch.equal(y[0], x[0]) and torch.equal(y[1], x[1].flip(-1))


def test_pixels_follow_the_box():
    """A white rectangle = the face box: after crop + flip + resize on the device the white pixels sit where
    ``map_boxes`` puts the box (to the pixel), and the pixels match PIL's bilinear resize of the same crop."""
    x = np.zeros((3, 64, 64), np.uint8)
    x[:, 20:40, 10:30] = 255                              # box (10, 20, 30, 40)
    box = torch.tensor([[10.0, 20.0, 30.0, 40.0]] * 2)
    p = _params([8, 8], [4, 4], [48, 48], [40, 40], [False, True])
    y = crop_flip_resize(torch.from_numpy(x)[None].repeat(2, 1, 1, 1), p, 96, "bilinear")
    b = map_boxes(box, p, 96)
    for i in range(2):
        ys, xs = np.nonzero(y[i, 0].numpy() > 127)
        x1, y1, x2, y2 = b[i].tolist()
        assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1
        assert abs(ys.min() - y1) <= 1 and abs(ys.max() + 1 - y2) <= 1
    pil = np.asarray(Image.fromarray(x.transpose(1, 2, 0)).resize((96, 96), Image.BILINEAR, box=(4, 8, 44, 56)))
    diff = np.abs(pil.astype(int) - y[0].permute(1, 2, 0).numpy().astype(int))
    assert diff[2:-2, 2:-2].max() <= 1                    # interior: same sampling grid, same kernel


def test_same_index_same_views_and_the_seed_matters():
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)      # as the loader ships it: N, H, W, C
    box = torch.tensor([[4.0, 4.0, 28.0, 28.0]] * 4)
    aug = DeviceAugment({"image": "mae"}, 16, seed=3, rank=0)
    a, b = aug({"image": x, "box": box}, 5), aug({"image": x, "box": box}, 5)
    c = aug({"image": x, "box": box}, 6)
    d = DeviceAugment({"image": "mae"}, 16, seed=3, rank=1)({"image": x, "box": box}, 5)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["box"], b["box"])
    assert not torch.equal(a["image"], c["image"]) and not torch.equal(a["image"], d["image"])
    assert a["image"].shape == (4, 3, 16, 16) and a["image"].dtype == torch.uint8


# ---------------------------------------------------------------- the loader's decode-only views


def _stream(urls, *, views, start=0, lanes=1, bs=8, decode="cpu", raw_size=32, labeled=False, extra=()):
    specs = [StreamSpec((Source(tuple(urls)),), tuple(views), bs, labeled, raw_size=raw_size)] + list(extra)
    return ShardStream(specs, img_size=32, rank=0, world_size=1, batches_per_epoch=5, seed=3, shuffle_buffer=32,
                       start_batch=start, num_lanes=lanes, decode=decode)


def _take(stream, lanes, n):
    it = iter(make_loader(stream, lanes if lanes > 1 else 0))
    return [next(it) for _ in range(n)]


DEV = place_views((View("image", "mae"),), "device")


def test_place_views_keeps_strong_on_the_cpu():
    v = place_views((View("image", "weak"), View("weak", "weak"), View("strong", "strong")), "device")
    assert [x.on_device for x in v] == [True, True, False]
    assert not any(x.on_device for x in place_views(v, "cpu"))


@pytest.mark.parametrize("lanes", [1, 2])
def test_resume_replays_identical_device_batches(shards, lanes):
    urls = read_manifest(shards["fr"]).shard_urls()
    aug = DeviceAugment({"image": "mae"}, 32, seed=3, rank=0)
    ref = [aug(b, int(b["__index__"])) for b in _take(_stream(urls, views=DEV, lanes=lanes), lanes, 9)]
    assert ref[0]["image"].shape == (8, 3, 32, 32)
    res = [aug(b, int(b["__index__"])) for b in _take(_stream(urls, views=DEV, lanes=lanes, start=4), lanes, 5)]
    for a, b in zip(ref[4:], res):
        assert a["__key__"] == b["__key__"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["box"], b["box"])


def test_decode_only_views_and_device_decode_agree(shards):
    """CPU decode ships uint8 at the stored size + the stored box; device decode ships the JPEG bytes; after
    ``DeviceAugment`` both give the same views (libjpeg both ways)."""
    urls = read_manifest(shards["labeled"]).shard_urls()
    views = place_views((View("image", "weak"),), "device")
    raw = _take(_stream(urls, views=views, labeled=True), 1, 2)[1]
    byt = _take(_stream(urls, views=views, labeled=True, decode="device"), 1, 2)[1]
    assert raw["image"].shape == (8, 32, 32, 3) and raw["image"].dtype == torch.uint8   # as decoded
    assert isinstance(byt["image"], list) and isinstance(byt["image"][0], bytes)
    assert raw["__key__"] == byt["__key__"]
    torch.testing.assert_close(raw["box"], byt["box"])
    np.testing.assert_allclose(raw["box"][0].numpy(), [32 * 0.15, 32 * 0.1, 32 * 0.85, 32 * 0.9], rtol=1e-6)
    aug = DeviceAugment({"image": "weak"}, 32, seed=0, rank=0)
    a, b = aug(raw, 1), aug(byt, 1, torch.device("cpu"))
    assert torch.equal(a["box"], b["box"])
    assert (a["image"].int() - b["image"].int()).abs().max() <= 1


def test_semisup_stream_device_and_cpu_views(shards):
    lab_views = place_views((View("image", "weak"),), "device")
    unl_views = place_views((View("weak", "weak"), View("strong", "strong")), "device")
    unl = StreamSpec((Source(tuple(read_manifest(shards["unlabeled"]).shard_urls())),), unl_views, 16, False, "u_")
    b = _take(_stream(read_manifest(shards["labeled"]).shard_urls(), views=lab_views, labeled=True, extra=[unl]),
              1, 1)[0]
    assert b["u_weak"].shape == (16, 32, 32, 3) and b["u_strong"].shape == (16, 3, 32, 32)
    out = DeviceAugment({"image": "weak", "u_weak": "weak"}, 24, seed=0, rank=0)(b, 0)
    assert out["image"].shape == (8, 3, 24, 24) and out["u_weak"].shape == (16, 3, 24, 24)
    assert torch.equal(out["u_strong"], b["u_strong"])        # RandAugment view made on the CPU


def test_draft_size_rule_matches_pil():
    import io

    for size, target in ((112, 32), (224, 224), (200, 48), (64, 32), (97, 24)):
        buf = io.BytesIO()
        Image.new("RGB", (size, size), (9, 9, 9)).save(buf, format="JPEG")
        img = Image.open(io.BytesIO(buf.getvalue()))
        img.draft("RGB", (target, target))
        assert img.size == (draft_decoded_size(size, target),) * 2


def test_shard_with_mixed_sizes_is_resized_and_counted(tmp_path):
    imgs = face_images(24, 32)
    for i in (3, 10, 17):
        imgs[i] = face_images(1, 48, seed=i)[0]
    folder = write_shard_folder(str(tmp_path / "mixed"), imgs, [-1] * 24, dataset="mixed", num_classes=0,
                                samples_per_shard=24)
    urls = read_manifest(folder).shard_urls()
    odd = ("img00003", "img00010", "img00017")
    batches = _take(_stream(urls, views=DEV, bs=8, raw_size=32), 1, 3)
    assert all(b["image"].shape == (8, 32, 32, 3) for b in batches)
    n_odd = sum(k.endswith(odd) for b in batches for k in b["__key__"])     # resampled: repeats possible
    assert n_odd > 0 and int(batches[-1]["__resized__"][1]) == n_odd and int(batches[-1]["__corrupt__"][1]) == 0
    # device decode: the worker reads each JPEG's header; strays are resized + re-encoded there and counted
    aug = DeviceAugment({"image": "mae"}, 32, seed=0, rank=0)
    batches = _take(_stream(urls, views=DEV, bs=8, decode="device"), 1, 3)
    for b in batches:
        assert aug(b, int(b["__index__"]), torch.device("cpu"))["image"].shape == (8, 3, 32, 32)
    assert int(batches[-1]["__resized__"][1]) == sum(k.endswith(odd) for b in batches for k in b["__key__"]) > 0
    assert aug.resized == 0
    # ... and the device-side stack still resizes a stray it is handed (first image's size wins)
    x, scale = aug._stack([torch.zeros(3, 32, 32, dtype=torch.uint8), torch.zeros(3, 48, 48, dtype=torch.uint8)])
    assert x.shape == (2, 3, 32, 32) and aug.resized == 1 and scale[1].tolist() == pytest.approx([32 / 48] * 4)


def test_undecodable_jpeg_in_a_device_batch_is_replaced_and_counted():
    import io

    buf = io.BytesIO()
    Image.fromarray(face_images(1, 32)[0]).save(buf, format="JPEG")
    imgs, bad = decode_jpegs([buf.getvalue(), b"not a jpeg" * 4, buf.getvalue()], torch.device("cpu"))
    assert bad == 1 and len(imgs) == 3 and all(t.shape == (3, 32, 32) for t in imgs)


# ---------------------------------------------------------------- the tasks train through the device path


def _loss_falls(losses):
    k = max(2, len(losses) // 4)
    return float(np.mean(losses[-k:])) < float(np.mean(losses[:k]))


def test_mae_facemix_semisup_train_through_the_device_path(shards):
    from ssfer_dist.models.classifier import build_classifier
    from ssfer_dist.models.mae import build_mae
    from ssfer_dist.ssl import EMATeacher, build_threshold
    from ssfer_dist.tasks import FaceMixFinetune, MAEPretrain, SemiSupervised

    torch.manual_seed(0)
    lab = read_manifest(shards["labeled"]).shard_urls()
    unl = read_manifest(shards["unlabeled"]).shard_urls()

    def run(task, model, stream, keys, steps, lr):
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        aug = DeviceAugment(keys, 32, seed=1, rank=0, scale=(0.6, 1.0))
        losses = []
        for step, raw in enumerate(_take(stream, 1, steps)):
            batch = aug({k: v for k, v in raw.items() if not k.startswith("__")}, int(raw["__index__"]))
            out = task(batch, step)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            if hasattr(task, "after_step"):
                task.after_step(step)
            losses.append(float(out["loss"].detach()))
        return losses

    mae = build_mae("micro", 32, 8, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    losses = run(MAEPretrain(mae, 0.75, noise_seed=0), mae, _stream(lab, views=DEV, bs=16), {"image": "mae"}, 30,
                 2e-3)
    assert _loss_falls(losses), losses

    views = place_views((View("image", "weak"),), "device")
    clf = build_classifier("micro", 32, 8, num_classes=7, drop_path=0.0)
    task = FaceMixFinetune(clf, 7, alpha=1.0, smoothing=0.0, seed=0)
    losses = run(task, clf, _stream(lab, views=views, labeled=True, bs=16), {"image": "weak"}, 30, 2e-3)
    assert _loss_falls(losses), losses

    clf = build_classifier("micro", 32, 8, num_classes=7, drop_path=0.0)
    uv = place_views((View("weak", "weak"), View("strong", "strong")), "device")
    spec = StreamSpec((Source(tuple(unl)),), uv, 16, False, "u_")
    task = SemiSupervised(clf, EMATeacher(clf, decay=0.9), build_threshold("fixed", 7, tau=0.5), 7, lambda_u=1.0)
    losses = run(task, clf, _stream(lab, views=views, labeled=True, bs=16, extra=[spec]),
                 {"image": "weak", "u_weak": "weak"}, 30, 2e-3)
    assert _loss_falls(losses), losses


@pytest.mark.parametrize("data,needle", [
    ({"crop_scale": [0.0, 1.0]}, "data.crop_scale: expected 0 < min <= max <= 1"),
    ({"crop_ratio": [1.5, 1.0]}, "data.crop_ratio: expected 0 < min <= max"),
    ({"augment_on": "gpu"}, "data.augment_on"),
    ({"decode": "device", "augment_on": "cpu"}, "data.decode: device decoding feeds the device augmentation"),
])
def test_config_keys_are_checked(data, needle):
    from ssfer_dist.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        from_dict({"data": dict({"shards": "/x"}, **data)})


def test_default_training_views_are_placed_on_the_device():
    from ssfer_dist.config import Config, SemiSupCfg, ThresholdCfg, TrainCfg
    from ssfer_dist.stages import get_stage
    from ssfer_dist.stages.base import StageConfigs

    cfg = Config(train=TrainCfg(stage="semisup"), semisup=SemiSupCfg(threshold=ThresholdCfg(kind="dtm")))
    lab, unl = get_stage("semisup").data_views(StageConfigs.of(cfg))
    assert [v.on_device for v in lab] == [True]
    assert {v.name: v.on_device for v in unl} == {"weak": True, "strong": False, "weak2": True}


def test_fast_decode_is_pils_pixels_and_corrupt_samples_are_counted(tmp_path):
    import io

    from ssfer_dist.data.pipeline import decode_hwc, decode_image

    for im in face_images(4, 40):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=90)
        np.testing.assert_array_equal(decode_hwc(buf.getvalue()), np.asarray(decode_image(buf.getvalue())[0]))
    folder = write_shard_folder(str(tmp_path / "bad"), face_images(40, 32), [-1] * 40, dataset="bad",
                                num_classes=0, samples_per_shard=10, corrupt_every=4)
    batches = _take(_stream(read_manifest(folder).shard_urls(), views=DEV), 1, 6)
    assert all(b["image"].shape == (8, 32, 32, 3) for b in batches)
    assert int(batches[-1]["__corrupt__"][1]) > 0
    assert all("img00003" not in k for b in batches for k in b["__key__"])


def test_fast_decode_caps_the_header_pixels_like_pil_open():
    import io

    from ssfer_dist.data.pipeline import decode_hwc, jpeg_frame_size
    from ssfer_dist.shards.safeimage import ImageTooLarge

    buf = io.BytesIO()
    Image.new("RGB", (37, 61), (1, 2, 3)).save(buf, format="JPEG", progressive=True)
    assert jpeg_frame_size(buf.getvalue()) == (37, 61) and decode_hwc(buf.getvalue()).shape == (61, 37, 3)
    data = bytearray(buf.getvalue())
    k = bytes(data).find(b"\xff\xc2")                        # progressive SOF: claim 65535 x 65535
    data[k + 5:k + 9] = b"\xff\xff\xff\xff"
    with pytest.raises(ImageTooLarge):
        decode_hwc(bytes(data))
    assert jpeg_frame_size(b"not a jpeg") is None
