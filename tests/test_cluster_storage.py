"""A cluster run into object storage: a real S3 API (moto's server) on loopback, a real
LocalCluster of worker processes, the embedded origin (issue 12, item 4; RELIABILITY.md
cases 43, 47 and 48).

Every result is compared, row for row, with a single-machine run of the same input; the
bucket is read back with s3fs, as a reader of the dataset would.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from cluster_helpers import (
    LOOPBACK,
    S3,
    WorkerKiller,
    client,
    mixed_input,
    rows,
    s3,
    scratch,
    tar_sample_keys,
)
from fetchpool import Origin, Status, download
from fetchpool.cluster.part import publish
from fetchpool.errors import ConfigError, FetchpoolError
from fetchpool.state.journal import iter_journal
from fetchpool.state.paths import part_done_name, part_records_name
from fetchpool.storage import Store
from reliability_helpers import cli, cli_env

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow
__all__ = ["client", "s3", "scratch"]  # fixtures, imported for pytest


def objects(s3: S3, url: str) -> dict[str, Any]:
    """Every object under ``url``: its name relative to it, and its listing info."""
    fs = s3.filesystem()
    root = url.removeprefix("s3://").rstrip("/")
    return {name[len(root) + 1 :]: info for name, info in fs.find(root, detail=True).items()}


def bucket_shard_keys(s3: S3, url: str) -> Any:
    fs = s3.filesystem()
    root = url.removeprefix("s3://")
    names = [n for n in objects(s3, url) if n.endswith(".tar") and not n.startswith(".")]
    return tar_sample_keys(io.BytesIO(fs.cat_file(f"{root}/{n}")) for n in names)


def no_scratch_left(scratch: Path) -> list[Path]:
    return [p for p in scratch.rglob("fetchpool-scratch/*/*")]


@pytest.mark.parametrize(
    ("fmt", "remote_input"),
    [("files", False), ("webdataset", True), ("parquet", False)],
)
def test_a_cluster_run_into_s3_equals_a_single_machine_run(
    client: Any, s3: S3, scratch: Path, tmp_path: Path, fmt: str, remote_input: bool
) -> None:
    bucket = s3.bucket(f"ds-{uuid.uuid4().hex[:8]}")
    dest = f"s3://{bucket}/out"
    with Origin(latency=0.02) as origin:
        src = mixed_input(origin, tmp_path / "urls.txt")
        source: str | Path = src
        if remote_input:  # the input read from the bucket too
            s3.filesystem().put_file(str(src), f"{bucket}/in/urls.txt")
            source = f"s3://{bucket}/in/urls.txt"
        options = {"format": fmt, "shard_size": 20, "threads": 8, **LOOPBACK}
        single = download(src, tmp_path / "single", **options)
        spread = download(
            source, dest, cluster=client, parts=5, storage_options=s3.storage_options, **options
        )
    assert spread.exit_code == single.exit_code == 1  # the 404s and bad lines
    assert rows(spread) == rows(single)
    assert spread.counts == single.counts and spread.errors == single.errors
    published = objects(s3, dest)
    assert not [n for n in published if n.endswith((".db", ".db-wal", ".part")) or "/.fp-" in n]
    for index in range(5):
        assert part_done_name(index) in published and part_records_name(index) in published
    ok_paths = {r.path.split("#")[0] for r in spread.records(Status.OK)}
    outputs = {n for n in published if n.startswith("part-")}
    assert ok_paths <= outputs, "every ok record's file is in the bucket"
    if fmt == "webdataset":
        keys = bucket_shard_keys(s3, dest)
        ok = {f"{r.position:09d}" for r in spread.records() if r.status is Status.OK}
        assert set(keys) == ok and set(keys.values()) == {1}
    assert no_scratch_left(scratch) == [], "scratch is emptied once a part is published"


def test_a_worker_killed_mid_part_into_s3_changes_nothing_and_no_reader_sees_a_partial_shard(
    client: Any, s3: S3, tmp_path: Path
) -> None:
    """SIGKILL one worker at ~30%. Meanwhile a reader lists the bucket over and over and
    opens every shard it sees: each must be a whole tar (case 48). The merged result equals
    a single-machine run and no sample is in two shards (case 47)."""
    bucket = s3.bucket(f"ds-{uuid.uuid4().hex[:8]}")
    dest = f"s3://{bucket}/out"
    pids = sorted(client.run(os.getpid).values())
    seen: dict[str, int] = {}
    broken: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        fs = s3.filesystem()
        while not stop.is_set():
            fs.invalidate_cache()
            for name in list(objects(s3, dest)):
                if not name.endswith(".tar") or name in seen:
                    continue
                try:
                    seen[name] = sum(
                        tar_sample_keys(
                            iter([io.BytesIO(fs.cat_file(f"{bucket}/out/{name}"))])
                        ).values()
                    )
                except FileNotFoundError:
                    continue  # removed by a republish in between: never seen partial
                except Exception as exc:
                    broken.append(f"{name}: {exc!r}")
            time.sleep(0.05)

    with Origin(latency=0.1) as origin:
        src = mixed_input(origin, tmp_path / "urls.txt", count=200)
        options = {"format": "webdataset", "shard_size": 10, "threads": 4, **LOOPBACK}
        killer = WorkerKiller(origin, pids[0], after=45)  # ~30% of the images
        threads = [killer, threading.Thread(target=reader)]
        for thread in threads:
            thread.start()
        try:
            spread = download(
                src, dest, cluster=client, parts=4, storage_options=s3.storage_options, **options
            )
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        single = download(src, tmp_path / "single", **options)
    assert killer.killed
    assert broken == [], "a reader saw a partial shard"
    assert seen, "the reader saw shards while the run went on"
    assert rows(spread) == rows(single)
    keys = bucket_shard_keys(s3, dest)
    assert set(keys.values()) == {1}, "no sample in two shards"
    assert len(keys) == single.ok


def test_the_cli_writes_a_webdataset_from_a_parquet_input_in_s3_and_reruns_publish_nothing(
    s3: S3, tmp_path: Path
) -> None:
    """The issue's command, with the standard AWS environment pointing at the S3 API:
    ``fetchpool get s3://…/urls.parquet -o s3://bucket/ds --format webdataset --cluster
    local:2``; the driver is SIGKILLed mid-run, the same command finishes the run, and a
    part published before the kill is not published again (case 48)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bucket = s3.bucket(f"ds-{uuid.uuid4().hex[:8]}")
    dest = f"s3://{bucket}/ds"
    env = {**cli_env(), **s3.env}
    with Origin(latency=0.2) as origin:
        urls = mixed_input(origin, tmp_path / "urls.txt", count=160).read_text().splitlines()
        table = pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]})
        pq.write_table(table, tmp_path / "urls.parquet")
        s3.filesystem().put_file(str(tmp_path / "urls.parquet"), f"{bucket}/urls.parquet")
        args = cli("get", f"s3://{bucket}/urls.parquet", "-o", dest, "--format", "webdataset",
                   "--cluster", "local:2", "--parts", "8", "--threads", "4",
                   "--allow-private-networks", "-q")  # fmt: skip
        driver = subprocess.Popen(args, env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and driver.poll() is None:
                done = [n for n in objects(s3, dest) if n.endswith(".done")]
                if len(done) >= 2:
                    break
                time.sleep(0.1)
            assert driver.poll() is None, driver.stderr.read() if driver.stderr else ""
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=30)
        finally:
            if driver.poll() is None:
                driver.kill()
            if driver.stderr:
                driver.stderr.close()
        before = objects(s3, dest)
        done_before = {n: before[n]["LastModified"] for n in before if n.endswith(".done")}
        published_before = {
            n: before[n]["LastModified"]
            for n in before
            if n.split("/")[0] in {d.split("/")[-1].removesuffix(".done") for d in done_before}
        }
        again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240,
                               check=False)  # fmt: skip
        assert again.returncode == 1, again.stderr  # the 404s and bad lines
        single = download(tmp_path / "urls.parquet", tmp_path / "single", format="webdataset",
                          threads=4, **LOOPBACK)  # fmt: skip
    after = objects(s3, dest)
    for name, stamp in {**done_before, **published_before}.items():
        assert after[name]["LastModified"] == stamp, f"{name} was published again"
    merged = list(iter_journal(dest, storage_options=s3.storage_options))
    assert rows(merged) == rows(single)
    assert merged[5].meta == {"caption": "c5"}
    keys = bucket_shard_keys(s3, dest)
    assert set(keys.values()) == {1} and len(keys) == single.ok
    manifest = subprocess.run(cli("manifest", dest, "--format", "csv"), env=env,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert manifest.returncode == 0, manifest.stderr
    lines = manifest.stdout.splitlines()
    assert len(lines) == 1 + 160
    assert all(",part-0000" in line for line in lines[1:] if ",ok," in line)


def test_a_republished_part_replaces_what_a_killed_publish_left(s3: S3, tmp_path: Path) -> None:
    """A publish killed half-way leaves some objects and no ``.done``; the next publish of
    that part removes them first, so a shard of the killed attempt never stays beside the
    new ones (whose grouping may differ)."""
    bucket = s3.bucket(f"ds-{uuid.uuid4().hex[:8]}")
    store = Store(f"s3://{bucket}/ds", s3.storage_options)
    fs = s3.filesystem()
    fs.pipe_file(f"{bucket}/ds/part-00003/00009.tar", b"left by a killed publish")
    with Origin() as origin:
        (tmp_path / "urls.txt").write_text(f"{origin.image_url(1, small=True)}\n")
        work = tmp_path / "work"
        report = download(tmp_path / "urls.txt", work, format="webdataset", **LOOPBACK)
    assert report.ok == 1
    publish(store, work, 3)
    names = set(objects(s3, store.url))
    assert "part-00003/00009.tar" not in names
    assert "part-00003/00000.tar" in names and part_records_name(3) in names
    assert not any(".fetchpool/state" in n or n.startswith("part-00003/.fetchpool") for n in names)


def test_storage_errors_are_clear(client: Any, s3: S3, tmp_path: Path) -> None:
    with Origin() as origin:
        src = mixed_input(origin, tmp_path / "urls.txt", count=10)
        with pytest.raises(FetchpoolError, match="bucket 'no-such-bucket' does not exist"):
            download(src, "s3://no-such-bucket/ds", cluster=client,
                     storage_options=s3.storage_options, **LOOPBACK)  # fmt: skip
        with pytest.raises(ConfigError, match="unknown storage protocol 'nosuch'"):
            download(src, "nosuch://b/ds", cluster=client, **LOOPBACK)
        with pytest.raises(ConfigError, match="needs --cluster"):
            download(src, f"s3://{s3.bucket('b-' + uuid.uuid4().hex[:8])}/ds", **LOOPBACK)
        with pytest.raises(FetchpoolError, match="input file not found: s3://"):
            download(f"s3://{s3.bucket('c-' + uuid.uuid4().hex[:8])}/missing.txt",
                     tmp_path / "out", cluster=client, storage_options=s3.storage_options,
                     **LOOPBACK)  # fmt: skip
    done = subprocess.run(cli("get", str(src), "-o", "s3://b/ds"), env=cli_env(),
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2 and "needs --cluster" in done.stderr
    bad = subprocess.run(cli("get", str(src), "-o", "s3://b/ds", "--cluster", "local:1",
                             "--storage-option", "novalue"), env=cli_env(),
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert bad.returncode == 2 and "--storage-option" in bad.stderr and "KEY=VALUE" in bad.stderr
