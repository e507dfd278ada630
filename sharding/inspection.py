"""``ssfer-shard inspect``: a text summary of a shard folder and a contact sheet PNG (samples with
their face boxes drawn, class name or identity underneath). A sample that does not decode (corrupt jpg,
decompression bomb, bad json) gets a marked tile and is counted; refused tar members (unsafe names,
links, members over the cap) are counted; neither stops the inspection."""
from __future__ import annotations

import io
import logging
import math
from typing import List, Optional, Tuple

from PIL import Image, ImageDraw

from ssfer_dist import storage
from ssfer_dist.shards.manifest import read_manifest
from ssfer_dist.shards.schema import EXT_IMAGE, EXT_META, SampleMeta
from ssfer_dist.shards.safeimage import open_image
from ssfer_dist.shards.tario import DEFAULT_MAX_MEMBER_BYTES, MemberProblem, iter_tar_samples

__all__ = ["inspect_shards", "contact_sheet", "summary"]

log = logging.getLogger(__name__)


def summary(m) -> str:
    """Human-readable summary of a :class:`~ssfer_dist.shards.manifest.Manifest`."""
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


def _decode(key: str, s) -> Tuple[Optional[Image.Image], Optional[SampleMeta], str]:
    """``(image, meta, "")`` or ``(None, meta or None, why)`` for a sample that does not decode."""
    meta = None
    try:
        meta = SampleMeta.from_json(s[EXT_META]) if EXT_META in s else None
        if EXT_IMAGE not in s:
            return None, meta, "no jpg"
        img = open_image(s[EXT_IMAGE])
        img.load()
        return img.convert("RGB"), meta, ("" if meta is not None else "no json")
    except Exception as e:  # noqa: BLE001 - untrusted bytes: any decode error marks the sample
        log.warning("%s: does not decode (%s: %s)", key, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None, meta, type(e).__name__


def _collect(m, num: int, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, stats: Optional[dict] = None):
    """Up to ``num`` ``(image or None, meta or None, problem)`` tiles; counts in ``stats`` (``corrupt``,
    ``refused``)."""
    out: List[Tuple[Optional[Image.Image], Optional[SampleMeta], str]] = []
    stats = {} if stats is None else stats
    stats.setdefault("corrupt", 0)
    stats.setdefault("refused", 0)
    for sh in m.shards:
        refused: List[MemberProblem] = []
        with storage.open_read(sh.url) as f:
            for key, s in iter_tar_samples(f, max_member_bytes, refused):
                img, meta, why = _decode(key, s)
                if why:
                    stats["corrupt"] += 1
                out.append((img, meta, why))
                if len(out) >= num:
                    break
        stats["refused"] += len(refused)
        for p in refused:
            log.warning("%s: refused %s", sh.url, p)
        if len(out) >= num:
            break
    return out


def contact_sheet(samples, class_names: List[str], tile: int = 128) -> Image.Image:
    """A grid image of ``(PIL image, SampleMeta[, problem])`` tiles with boxes (red; yellow for fallback
    boxes) under a legend strip saying what the colours mean; a tile whose image is ``None`` is drawn as a
    crossed dark-red square labelled with the problem."""
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
    for i, (img, meta, *why) in enumerate(samples):
        x0, y0 = (i % cols) * tile, legend_h + (i // cols) * (tile + label_h)
        if img is None:
            draw.rectangle([x0, y0, x0 + tile - 1, y0 + tile - 1], fill=(90, 0, 0), outline=(255, 0, 0), width=2)
            draw.line([x0, y0, x0 + tile - 1, y0 + tile - 1], fill=(255, 0, 0), width=2)
            draw.line([x0, y0 + tile - 1, x0 + tile - 1, y0], fill=(255, 0, 0), width=2)
            draw.text((x0 + 2, y0 + tile + 1), f"CORRUPT {why[0] if why else ''}"[:20], fill=(255, 80, 80))
            continue
        s = tile / max(img.size)
        sheet.paste(img.resize((round(img.size[0] * s), round(img.size[1] * s))), (x0, y0))
        if meta is None:
            draw.text((x0 + 2, y0 + tile + 1), "NO JSON", fill=(255, 80, 80))
            continue
        b = [v * s for v in meta.box]
        color = (255, 220, 0) if meta.box_source == "fallback" else (255, 40, 40)
        draw.rectangle([x0 + b[0], y0 + b[1], x0 + b[2] - 1, y0 + b[3] - 1], outline=color, width=2)
        if 0 <= meta.cls < len(class_names):
            text = class_names[meta.cls]
        else:
            text = f"id {meta.identity}" if meta.identity is not None else meta.source_id
        draw.text((x0 + 2, y0 + tile + 1), text[:20], fill=(230, 230, 230))
    return sheet


def inspect_shards(url: str, sheet: Optional[str] = "contact_sheet.png", num: int = 64,
                   max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, stats: Optional[dict] = None) -> str:
    """Summary text of the shard folder ``url``; writes the contact sheet PNG to ``sheet`` (local path
    or URL) unless ``None``. ``stats`` (when given) receives the ``corrupt`` / ``refused`` counts."""
    m = read_manifest(url)
    text = summary(m)
    if sheet:
        stats = {} if stats is None else stats
        samples = _collect(m, num, max_member_bytes, stats)
        buf = io.BytesIO()
        contact_sheet(samples, m.class_names).save(buf, format="PNG")
        storage.put_bytes(sheet, buf.getvalue())
        text += f"\n  contact sheet: {sheet} ({len(samples)} samples)"
        if stats["corrupt"] or stats["refused"]:
            text += (f"\n  problems: {stats['corrupt']} sample(s) on the sheet do not decode (marked CORRUPT), "
                     f"{stats['refused']} tar member(s) refused; run `ssfer-shard verify {m.url}`")
    return text
