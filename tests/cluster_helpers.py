"""What the cluster tests share: a real LocalCluster, a real S3 API on loopback, inputs, rows.

The S3 API is moto's server mode in a process of its own (as s3fs's own test suite runs it),
on a free loopback port; nothing here reaches any other address.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fetchpool import Origin

LOOPBACK: dict[str, Any] = {"allow_private_networks": True}


def local_cluster(workers: int, scratch: Path | None = None) -> Any:
    """A LocalCluster of ``workers`` worker processes, as ``--cluster local:N`` starts one;
    ``scratch`` becomes the workers' dask ``temporary-directory`` (their local scratch)."""
    import dask
    import distributed

    settings: dict[str, Any] = {"distributed.worker.daemon": False}
    if scratch is not None:
        settings["temporary-directory"] = str(scratch)
    with dask.config.set(settings):
        return distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        )


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cluster workers' local scratch (dask's temporary-directory)."""
    return tmp_path_factory.mktemp("scratch")


@pytest.fixture(scope="module")
def client(scratch: Path) -> Iterator[Any]:
    """A client of a LocalCluster of 2 worker processes (as ``--cluster local:2`` starts)."""
    import distributed

    cluster = local_cluster(2, scratch)
    with distributed.Client(cluster) as connected:
        yield connected
    cluster.close()


def mixed_input(origin: Origin, path: Path, count: int = 240) -> Path:
    """Images with repeated URLs, 404s and bad lines, as real lists have them."""
    lines = []
    for i in range(count):
        if i % 40 == 7:
            lines.append("not a url")
        elif i % 30 == 3:
            lines.append(origin.url(f"/status/404?n={i}"))
        else:
            lines.append(origin.image_url(i % (count * 3 // 4), small=True))
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def rows(records: Any) -> list[tuple[Any, ...]]:
    """What must be equal between runs: position, url, status, error code, sha256, bytes."""
    if hasattr(records, "records"):
        records = records.records()
    return [(r.position, r.url, r.status, r.error_code, r.sha256, r.bytes) for r in records]


def tar_sample_keys(tars: Iterator[Any]) -> Counter[str]:
    """Sample keys in the given open tar streams, counted (each must be 1)."""
    keys: Counter[str] = Counter()
    for stream in tars:
        with stream, tarfile.open(fileobj=stream) as tar:
            keys.update(m.name.split(".")[0] for m in tar if m.name.endswith(".json"))
    return keys


def shard_keys(dest: Path) -> Counter[str]:
    shards = (p for p in dest.rglob("*.tar") if ".fetchpool" not in p.parts)
    return tar_sample_keys(p.open("rb") for p in shards)


# --------------------------------------------------------------------------- S3 on loopback


@dataclass
class S3:
    """A moto S3 server on loopback: its endpoint, and the options/env that reach it."""

    endpoint: str
    process: subprocess.Popen[bytes]

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment, as S3-compatible stores are configured."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def bucket(self, name: str) -> str:
        fs = self.filesystem()
        fs.mkdir(name)
        return name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    pytest.importorskip("s3fs", reason="object storage tests need s3fs (the s3 extra)")
    pytest.importorskip("moto.server", reason="object storage tests need moto[server]")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)
        yield S3(endpoint, process)
    finally:
        process.terminate()
        process.wait(timeout=30)


class WorkerKiller(threading.Thread):
    """SIGKILLs ``pid`` (a Dask worker) once ``origin`` has served ``after`` images: a worker
    killed mid-part. ``killed`` says whether it happened (within a minute)."""

    def __init__(self, origin: Origin, pid: int, after: int) -> None:
        super().__init__(name="worker-killer")
        self.origin, self.pid, self.after = origin, pid, after
        self.killed = False

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while len(self.origin.requests("/small/")) < self.after and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(self.pid, signal.SIGKILL)
        self.killed = True
