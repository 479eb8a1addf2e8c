"""The CPU stage: decode, check, resize, re-encode and hash fetched images in worker processes.

``process_image`` is the pure, picklable function a worker runs; ``ImageStage`` is the process
pool around it that survives crashing and hanging workers.
"""

from __future__ import annotations

from fetchpool.process.images import ALLOWED_FORMATS, ImageResult, process_image
from fetchpool.process.stage import ImageStage, Processor

__all__ = ["ALLOWED_FORMATS", "ImageResult", "ImageStage", "Processor", "process_image"]
