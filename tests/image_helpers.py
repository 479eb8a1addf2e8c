"""Helpers shared by the CPU stage's tests (test_images.py, test_image_options.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from fetchpool.config import ImageConfig
from fetchpool.process.images import ImageResult, process_image


def run_image(src: Path, tmp_path: Path, **config: Any) -> ImageResult:
    """``process_image`` of ``src`` into ``tmp_path/out`` with ``ImageConfig(**config)``."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return process_image(str(src), str(out), ImageConfig(**config))


def opened(result: ImageResult) -> Image.Image:
    """The output image, loaded and detached from its file (format kept)."""
    assert result.ok, result
    assert result.temp_path is not None
    with Image.open(result.temp_path) as img:
        img.load()
        copy = img.copy()
        copy.format = img.format
    return copy
