"""Shared fixtures. Others may append fixtures below; keep each one self-contained."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fetchpool.origin import Origin


@pytest.fixture
def origin() -> Iterator[Origin]:
    """A fresh embedded origin (thread mode, no latency) on a free loopback port.

    Fresh per test, so ``/flaky`` and ``/retry-after`` counters and the request log start empty;
    starting one costs about a millisecond (the images are cached per process).
    """
    with Origin() as server:
        yield server
