"""Shared fixtures. Others may append fixtures below; keep each one self-contained."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engines import ENGINES
from fetchpool.config import FetchConfig
from fetchpool.fetch import HttpFetcher
from fetchpool.fetch import transport as transport_module
from fetchpool.origin import Origin
from fetchpool.proxies import PROXY_VARIABLES

# Before any test module is collected: configs built at import time (``CONFIG = ...``) capture
# the proxy variables too, and a proxy set on the CI machine must not route the suite's
# loopback traffic (fetchpool honours http_proxy & co., docs/usage.md).
for _name in {*PROXY_VARIABLES, "HTTP_PROXY"}:
    os.environ.pop(_name, None)


@pytest.fixture
def origin() -> Iterator[Origin]:
    """A fresh embedded origin (thread mode, no latency) on a free loopback port.

    Fresh per test, so ``/flaky`` and ``/retry-after`` counters and the request log start empty;
    starting one costs about a millisecond (the images are cached per process).
    """
    with Origin() as server:
        yield server


@pytest.fixture
def spy_connect(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every TCP connection attempt fetchpool makes; only loopback ones are really made."""
    attempts: list[tuple[str, int]] = []
    real = transport_module.open_socket

    def spy(ip: str, port: int, timeout: float | None, options: object) -> socket.socket:
        attempts.append((ip, port))
        if not ip.startswith("127."):
            raise ConnectionRefusedError(111, "refused by the test: not loopback")
        return real(ip, port, timeout, options)  # type: ignore[arg-type]

    real_start = transport_module.start_connect

    def spy_start(ip: str, port: int, options: object) -> tuple[socket.socket, int]:
        attempts.append((ip, port))  # the multiplexed driver's non-blocking connects
        if not ip.startswith("127."):
            raise ConnectionRefusedError(111, "refused by the test: not loopback")
        return real_start(ip, port, options)  # type: ignore[arg-type]

    monkeypatch.setattr(transport_module, "open_socket", spy)
    monkeypatch.setattr(transport_module, "start_connect", spy_start)
    return attempts


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """A fetch engine's ``--engine`` name: a test that takes it runs on every engine."""
    name: str = request.param
    return name


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    """A run's temp folder for fetchers under test."""
    path = tmp_path / "tmp"
    path.mkdir()
    return path


@pytest.fixture
def fetcher_factory(tmp_dir: Path) -> Iterator[Callable[..., HttpFetcher]]:
    """``factory(config, **kwargs)``: an HttpFetcher over ``tmp_dir``, closed after the test."""
    made: list[HttpFetcher] = []

    def make(config: FetchConfig, **kwargs: object) -> HttpFetcher:
        fetcher = HttpFetcher(config, tmp_dir, **kwargs)  # type: ignore[arg-type]
        made.append(fetcher)
        return fetcher

    yield make
    for fetcher in made:
        fetcher.close()


@pytest.fixture(autouse=True)
def _no_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees a proxy variable another test (or a library) set; proxy tests set their
    own afterwards, and subprocesses inherit the cleared environment."""
    for name in {*PROXY_VARIABLES, "HTTP_PROXY"}:
        monkeypatch.delenv(name, raising=False)
