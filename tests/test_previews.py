"""MAE previews a person can read: 8 samples, tiles scaled up, one labelled row per view."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ssfer_dist.stages.mae import PREVIEW_MIN_TILE, PREVIEW_ROWS, STAGE, preview_grid


def test_preview_grid_scales_and_labels():
    rows = [np.full((8, 32, 32, 3), v, np.uint8) for v in (40, 90, 140, 190)]
    img = preview_grid(rows, PREVIEW_ROWS, title="t")
    tile = 32 * 3                                 # ceil(96 / 32) = 3: whole-multiple nearest scaling
    assert img.size == (110 + 8 * (tile + 4), 18 + 4 * (tile + 4))
    a = np.asarray(img)
    for r, v in enumerate((40, 90, 140, 190)):    # each row's tiles hold that row's pixels
        y = 18 + r * (tile + 4) + tile // 2
        assert tuple(a[y, 110 + tile // 2]) == (v, v, v)
    assert (a[18:, :100] > 200).any()             # label text drawn in the left column


def test_mae_stage_preview_writes_a_labelled_png(tmp_path):
    from ssfer_dist.models.mae import build_mae
    from ssfer_dist.tasks import MAEPretrain

    torch.manual_seed(0)
    model = build_mae("micro", 32, 8, False, 32, 1, 2)
    task = MAEPretrain(model, mask_ratio=0.75, input_dtype=None, noise_seed=0, rank=0)
    batch = {"image": torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8)}
    STAGE.preview(task, batch, 7, str(tmp_path), None, 0)
    img = Image.open(tmp_path / "previews" / "step_00000007.png")
    tile = -(-PREVIEW_MIN_TILE // 32) * 32
    assert img.size == (110 + 8 * (tile + 4), 18 + len(PREVIEW_ROWS) * (tile + 4))
