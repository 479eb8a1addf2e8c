"""The embedded origin: a local HTTP server with deterministic images and every fault we test.

The only origin on a machine without internet: the offline demo, the integration tests, the lab
and the benchmarks all fetch from it. See :mod:`fetchpool.origin.server` for the endpoints and
:mod:`fetchpool.origin.images` for how the images are made.
"""

from __future__ import annotations

from fetchpool.origin.images import POOL_SIZE, image_bytes, payload_bytes
from fetchpool.origin.server import Origin, RequestLog

__all__ = ["POOL_SIZE", "Origin", "RequestLog", "image_bytes", "payload_bytes"]
