"""Write the photo corpus: ``python make_corpus.py DIR COUNT [--small N]``.

Run with a python that has Pillow (fetchpool's own venv does). Photo-like JPEGs of ~100 KB:
a smooth random field (big colour blobs) plus grain, so they compress like photographs, not like
flat colours or pure noise. Reuses ``fetchpool.origin.images`` when that module exists.
Writes ``manifest.json`` (name -> sha256) so the harness can verify downloads.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

TARGET_BYTES = 100_000
SIZE = (640, 480)


def _from_fetchpool(index: int) -> bytes | None:
    try:
        from fetchpool.origin import images  # type: ignore[import-not-found]
    except Exception:
        return None
    for name in ("photo_jpeg", "make_jpeg", "jpeg_bytes", "generate_jpeg", "photo"):
        fn = getattr(images, name, None)
        if callable(fn):
            try:
                data = fn(index)
            except Exception:
                return None
            if isinstance(data, bytes | bytearray) and data[:2] == b"\xff\xd8":
                return bytes(data)
    return None


def _photo(index: int, grain: float, quality: int = 85) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index)
    w, h = SIZE
    low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    noise = rng.normal(0.0, grain, size=(h, w, 1)).astype(np.float32)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _calibrate_grain() -> float:
    """Find the grain that makes a ~100 KB JPEG (bisection on a few samples)."""
    lo, hi = 0.0, 64.0
    for _ in range(14):
        mid = (lo + hi) / 2
        size = sum(len(_photo(i, mid)) for i in range(3)) / 3
        lo, hi = (mid, hi) if size < TARGET_BYTES else (lo, mid)
    return (lo + hi) / 2


def _small(index: int) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (64, 48), ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    # pad to ~4 KB with a JPEG comment so every small file is distinct and non-trivial
    body = buf.getvalue()
    comment = (f"fetchpool-bench-small-{index}".encode() * 200)[:3500]
    return body[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + body[2:]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("count", type=int)
    parser.add_argument("--small", type=int, default=1000, help="distinct small files for W4")
    args = parser.parse_args()
    photo_dir, small_dir = args.out / "photo", args.out / "small"
    photo_dir.mkdir(parents=True, exist_ok=True)
    small_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, str] = {}
    source = "fetchpool.origin.images"
    grain: float | None = None
    for i in range(args.count):
        data = _from_fetchpool(i)
        if data is None:
            source = "Pillow (benchmarks/harness/make_corpus.py)"
            grain = _calibrate_grain() if grain is None else grain
            data = _photo(i, grain)
        (photo_dir / f"{i:05d}.jpg").write_bytes(data)
        manifest[f"photo/{i:05d}.jpg"] = hashlib.sha256(data).hexdigest()
    for i in range(args.small):
        data = _small(i)
        (small_dir / f"{i:03d}.jpg").write_bytes(data)
        manifest[f"small/{i:03d}.jpg"] = hashlib.sha256(data).hexdigest()
    sizes = [p.stat().st_size for p in photo_dir.iterdir()]
    first = (photo_dir / "00000.jpg").read_bytes()
    from PIL import Image

    with Image.open(io.BytesIO(first)) as img:
        size_px = list(img.size)
    meta = {
        "count": args.count,
        "small": args.small,
        "source": source,
        "photo_mean_bytes": sum(sizes) // max(1, len(sizes)),
        "photo_size_px": size_px,
        "sha256": manifest,
    }
    (args.out / "manifest.json").write_text(json.dumps(meta))
    print(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
