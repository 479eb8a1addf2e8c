"""Per-image CPU of the CPU stage's resize by filter (issue 13): ``--downsample-filter``.

Draws a photo-like 3000x2000 JPEG (quality 90: gradients, blur, 8 % uniform noise, about
1.6 MB), then runs :func:`fetchpool.process.images.process_image` on it in this process,
``--resize 256 --encode jpeg`` for each resize mode and filter, and reports the median and
minimum CPU time (``time.process_time``: decode + resize + encode + hash + temp write) per
image, and how far each filter's pixels are from the reference (a full decode resized with
LANCZOS, output as PNG so JPEG encoding adds nothing), as the mean absolute difference on the
0..255 scale. Not a CI test: run it by hand (about a minute)::

    .venv/bin/python benchmarks/resample.py --runs 15
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

from PIL import Image, ImageFilter

from fetchpool.config import ImageConfig
from fetchpool.process.images import process_image

FILTERS = ("auto", "lanczos", "bicubic", "bilinear", "area", "nearest")
MODES = ("keep-ratio-largest", "center-crop")


def photo(path: str, size: tuple[int, int] = (3000, 2000)) -> None:
    rng = random.Random(7)
    ramps = [
        Image.linear_gradient("L").rotate(angle, Image.Resampling.BILINEAR).resize(size)
        for angle in (0, 90, 45)
    ]
    img = Image.merge("RGB", ramps).filter(ImageFilter.GaussianBlur(2))
    noise = Image.frombytes("L", size, rng.randbytes(size[0] * size[1])).convert("RGB")
    Image.blend(img, noise, 0.08).save(path, "JPEG", quality=90)


def cpu_ms(src: str, out: str, config: ImageConfig, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        began = time.process_time()
        result = process_image(src, out, config)
        times.append((time.process_time() - began) * 1000)
        assert result.ok and result.temp_path, result
        os.unlink(result.temp_path)
    return times


def difference(src: str, out: str, config: ImageConfig, reference: bytes) -> float:
    result = process_image(src, out, config)
    assert result.ok and result.temp_path, result
    with Image.open(result.temp_path) as img:
        pixels = img.convert("RGB").tobytes()
    os.unlink(result.temp_path)
    return sum(abs(a - b) for a, b in zip(pixels, reference, strict=True)) / len(pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "photo.jpg")
        photo(src)
        print(f"source 3000x2000 JPEG, {os.path.getsize(src) / 1e6:.2f} MB; {args.runs} runs")
        print(f"{'mode':19} {'filter':9} {'median ms':>9} {'min ms':>7} {'diff/255':>8}")
        for mode in MODES:
            base = {"resize": args.size, "resize_mode": mode}
            exact = ImageConfig(**base, encode="png", downsample_filter="lanczos")
            result = process_image(src, tmp, exact)
            assert result.temp_path is not None
            with Image.open(result.temp_path) as img:
                reference = img.convert("RGB").tobytes()
            for name in FILTERS:
                config = ImageConfig(**base, encode="jpeg", downsample_filter=name)
                cpu_ms(src, tmp, config, 2)  # warm caches
                times = cpu_ms(src, tmp, config, args.runs)
                lossless = ImageConfig(**base, encode="png", downsample_filter=name)
                diff = difference(src, tmp, lossless, reference)
                print(
                    f"{mode:19} {name:9} {statistics.median(times):9.1f} {min(times):7.1f}"
                    f" {diff:8.2f}"
                )


if __name__ == "__main__":
    main()
