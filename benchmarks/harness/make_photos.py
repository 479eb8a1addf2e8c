"""Write W6's camera-sized photos: ``python make_photos.py DIR COUNT``.

Run with a python that has Pillow and numpy (fetchpool's venv does). A mix of sizes as a
scraped image set has them, up to a 12 MP phone camera::

    share  size         megapixels
     40 %  640 x 480      0.3
     30 %  1632 x 1224    2.0
     20 %  2592 x 1944    5.0
     10 %  4000 x 3000   12.0

Content that compresses like a photograph, not like flat colour or pure noise: a smooth colour
field (bicubic upscale of a coarse random grid), soft shapes (ellipses, rectangles, polygons,
blurred), fine grain; JPEG quality 85-92, 4:2:0. Six distinct pictures per size; every file is
made distinct by a JPEG comment (so a sha256 names it), as the W1-W4 corpus is.
Writes ``DIR/big/NNNNN.jpg`` and ``DIR/big-manifest.json`` (name -> sha256, size mix).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
from pathlib import Path

SIZES = [((640, 480), 0.40), ((1632, 1224), 0.30), ((2592, 1944), 0.20), ((4000, 3000), 0.10)]
BASES_PER_SIZE = 6


def _picture(size: tuple[int, int], seed: int) -> bytes:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    w, h = size
    coarse = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    shapes = Image.new("RGB", (w, h))
    mask = Image.new("L", (w, h), 0)
    draw, mdraw = ImageDraw.Draw(shapes), ImageDraw.Draw(mask)
    for _ in range(pyrng.randint(12, 24)):
        x0, y0 = pyrng.uniform(-0.1, 1.0) * w, pyrng.uniform(-0.1, 1.0) * h
        x1, y1 = x0 + pyrng.uniform(0.03, 0.4) * w, y0 + pyrng.uniform(0.03, 0.4) * h
        color = tuple(pyrng.randrange(256) for _ in range(3))
        alpha = pyrng.randint(120, 255)
        kind = pyrng.random()
        if kind < 0.4:
            draw.ellipse((x0, y0, x1, y1), fill=color)
            mdraw.ellipse((x0, y0, x1, y1), fill=alpha)
        elif kind < 0.7:
            draw.rectangle((x0, y0, x1, y1), fill=color)
            mdraw.rectangle((x0, y0, x1, y1), fill=alpha)
        else:
            pts = [(pyrng.uniform(x0, x1), pyrng.uniform(y0, y1)) for _ in range(5)]
            draw.polygon(pts, fill=color)
            mdraw.polygon(pts, fill=alpha)
    # soft edges, as out-of-focus objects have; radius scales with the picture
    radius = max(1.0, w / 900)
    img.paste(
        shapes.filter(ImageFilter.GaussianBlur(radius)),
        mask=mask.filter(ImageFilter.GaussianBlur(radius)),
    )
    pixels = np.asarray(img, dtype=np.int16)
    grain = rng.normal(0.0, 5.0, size=(h, w, 1)).astype(np.int16)
    pixels = np.clip(pixels + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=pyrng.randint(85, 92))
    return buf.getvalue()


def _with_comment(jpeg: bytes, text: str) -> bytes:
    comment = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def plan(count: int) -> list[int]:
    """Size class of every file, in a fixed shuffled order (the shares above, rounded)."""
    classes: list[int] = []
    for k, (_, share) in enumerate(SIZES):
        classes += [k] * round(count * share)
    classes = (classes + [0] * count)[:count]
    random.Random(6).shuffle(classes)
    return classes


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("count", type=int)
    args = parser.parse_args()
    big = args.out / "big"
    big.mkdir(parents=True, exist_ok=True)
    bases = {
        (k, b): _picture(size, 1000 * k + b)
        for k, (size, _) in enumerate(SIZES)
        for b in range(BASES_PER_SIZE)
    }
    manifest: dict[str, str] = {}
    sizes: dict[str, int] = {}
    total = 0
    for i, k in enumerate(plan(args.count)):
        data = _with_comment(bases[(k, i % BASES_PER_SIZE)], f"fetchpool-bench-w6-{i}")
        (big / f"{i:05d}.jpg").write_bytes(data)
        manifest[f"big/{i:05d}.jpg"] = hashlib.sha256(data).hexdigest()
        label = "x".join(map(str, SIZES[k][0]))
        sizes[label] = sizes.get(label, 0) + 1
        total += len(data)
    meta = {
        "count": args.count,
        "mix": sizes,
        "mean_bytes": total // max(1, args.count),
        "base_bytes": {
            "x".join(map(str, SIZES[k][0])): len(bases[(k, 0)]) for k in range(len(SIZES))
        },
        "sha256": manifest,
    }
    (args.out / "big-manifest.json").write_text(json.dumps(meta))
    print(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
