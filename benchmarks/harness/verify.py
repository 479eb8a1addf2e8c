"""Check that a tool really downloaded every file: count, plus a sha256 (or JPEG size) sample.

Tools name their files differently (basename, img2dataset's shard/key, fetchpool's naming), so
a sampled file is checked against the set of corpus hashes rather than by name.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
SAMPLE = 25


@dataclass
class Verdict:
    ok: bool
    count: int
    detail: str


def output_files(root: Path) -> list[Path]:
    """Image files under root, skipping hidden state folders (.fetchpool/) and sidecars."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(dirpath, f)
            for f in filenames
            if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith(".")
        )
    return found


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF marker, without Pillow."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3):
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return width, height
        i += 2 + length
    return None


def verify(
    root: Path,
    expected: int,
    corpus_hashes: set[str],
    resize: int | None = None,
    seed: int = 0,
) -> Verdict:
    files = output_files(root)
    if len(files) != expected:
        return Verdict(False, len(files), f"expected {expected} files, found {len(files)}")
    sample = random.Random(seed).sample(files, min(SAMPLE, len(files)))
    for path in sample:
        data = path.read_bytes()
        if resize is None:
            if hashlib.sha256(data).hexdigest() not in corpus_hashes:
                return Verdict(False, len(files), f"{path.name}: sha256 not in the corpus")
        elif jpeg_size(data) != (resize, resize):
            got = jpeg_size(data)
            return Verdict(
                False, len(files), f"{path.name}: {got}, expected {resize}x{resize} JPEG"
            )
    what = (
        f"{len(sample)} sha256 match" if resize is None else f"{len(sample)} are {resize}px JPEGs"
    )
    return Verdict(True, len(files), f"{len(files)} files; sample of {what}")
