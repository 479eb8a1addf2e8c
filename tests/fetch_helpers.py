"""What the fetch drivers' tests share: one test configuration and one small JPEG-headed body,
so the blocking driver (test_fetch.py) and the selector loop (test_multiplex.py) are held to
the same settings."""

from __future__ import annotations

from fetchpool.config import FetchConfig

#: Starts like a JPEG (so the extension is sniffed as .jpg), 10 KiB in all.
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40
#: Loopback allowed, short timeouts, no minimum speed, bodies up to 1 MiB.
CONFIG = FetchConfig(
    allow_private_networks=True,
    connect_timeout=1.0,
    read_timeout=1.0,
    total_timeout=5.0,
    min_speed=0,
    max_bytes=1024 * 1024,
    user_agent="fetchpool-test/1",
)
