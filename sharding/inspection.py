"""``ssfer-shard inspect``: a text summary of a shard folder and a contact sheet PNG (samples with
their face boxes drawn, class name or identity underneath)."""
from __future__ import annotations

import io
import logging
import math
from typing import List, Optional, Tuple

from PIL import Image, ImageDraw

from ssfer_dist import storage
from ssfer_dist.data.manifest import read_manifest
from ssfer_dist.data.schema import EXT_IMAGE, EXT_META, SampleMeta
from ssfer_dist.data.tario import iter_tar_samples

__all__ = ["inspect_shards", "contact_sheet", "summary"]

log = logging.getLogger(__name__)


def summary(m) -> str:
    """Human-readable summary of a :class:`~ssfer_dist.data.manifest.Manifest`."""
    lines = [f"{m.url}: dataset {m.dataset!r}, role {m.role}, image size {m.image_size}",
             f"  shards: {len(m.shards)}   samples: {m.num_samples}   bytes: {m.num_bytes} "
             f"({m.num_bytes / max(1, m.num_samples):.0f} per sample)"]
    if m.num_classes:
        hist = m.class_hist()
        lines.append("  classes:")
        for name, n in zip(m.class_names, hist):
            lines.append(f"    {name:<10} {n:>8}  {100.0 * n / max(1, m.num_samples):5.1f}%")
    else:
        lines.append("  unlabeled")
    return "\n".join(lines)


def _collect(m, num: int) -> List[Tuple[Image.Image, SampleMeta]]:
    out: List[Tuple[Image.Image, SampleMeta]] = []
    for sh in m.shards:
        with storage.open_read(sh.url) as f:
            for _key, s in iter_tar_samples(f):
                if EXT_IMAGE in s and EXT_META in s:
                    img = Image.open(io.BytesIO(s[EXT_IMAGE])).convert("RGB")
                    out.append((img, SampleMeta.from_json(s[EXT_META])))
                if len(out) >= num:
                    return out
    return out


def contact_sheet(samples, class_names: List[str], tile: int = 128) -> Image.Image:
    """A grid image of ``(PIL image, SampleMeta)`` pairs with boxes (red; yellow for fallback boxes) under
    a legend strip saying what the colours mean."""
    n = max(1, len(samples))
    cols = min(8, n)
    rows = math.ceil(n / cols)
    label_h = 14
    legend_h = 2 * label_h + 4
    sheet = Image.new("RGB", (max(cols * tile, 256), legend_h + rows * (tile + label_h)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for j, (color, text) in enumerate((((255, 40, 40), "face box (annotation / detector / frame)"),
                                       ((255, 220, 0), "fallback box: no face found, centre crop"))):
        y = 2 + j * label_h
        draw.rectangle([4, y + 2, 14, y + 10], outline=color, width=2)
        draw.text((20, y), text, fill=(230, 230, 230))
    for i, (img, meta) in enumerate(samples):
        x0, y0 = (i % cols) * tile, legend_h + (i // cols) * (tile + label_h)
        s = tile / max(img.size)
        sheet.paste(img.resize((round(img.size[0] * s), round(img.size[1] * s))), (x0, y0))
        b = [v * s for v in meta.box]
        color = (255, 220, 0) if meta.box_source == "fallback" else (255, 40, 40)
        draw.rectangle([x0 + b[0], y0 + b[1], x0 + b[2] - 1, y0 + b[3] - 1], outline=color, width=2)
        if 0 <= meta.cls < len(class_names):
            text = class_names[meta.cls]
        else:
            text = f"id {meta.identity}" if meta.identity is not None else meta.source_id
        draw.text((x0 + 2, y0 + tile + 1), text[:20], fill=(230, 230, 230))
    return sheet


def inspect_shards(url: str, sheet: Optional[str] = "contact_sheet.png", num: int = 64) -> str:
    """Summary text of the shard folder ``url``; writes the contact sheet PNG to ``sheet`` (local path
    or URL) unless ``None``."""
    m = read_manifest(url)
    text = summary(m)
    if sheet:
        samples = _collect(m, num)
        buf = io.BytesIO()
        contact_sheet(samples, m.class_names).save(buf, format="PNG")
        storage.put_bytes(sheet, buf.getvalue())
        text += f"\n  contact sheet: {sheet} ({len(samples)} samples)"
    return text
