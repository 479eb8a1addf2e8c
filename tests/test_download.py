"""download() end to end: real HTTP over loopback against the embedded origin, real journal."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engines import ENGINES
from fetchpool import ErrorCode, Status, download
from fetchpool.origin import Origin

LOOPBACK = {"allow_private_networks": True}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def by_position(report_records: object) -> dict[int, object]:
    return {r.position: r for r in report_records}  # type: ignore[attr-defined]


def final_files(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name != ".fetchpool")


def test_content_equals_what_was_served(origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = download([origin.image_url(n) for n in range(12)], out, threads=6, **LOOPBACK)
    assert report.ok == 12 and report.exit_code == 0
    for record in report.records():
        assert record.path is not None
        data = (out / record.path).read_bytes()
        assert sha(data) == record.sha256 == sha(origin.image_bytes(record.position))
        assert record.content_type == "image/jpeg" and record.path.endswith(".jpg")
        assert record.http_status == 200 and record.attempts == 1
    assert not list((out / ".fetchpool" / "tmp").iterdir())


def test_requests_identify_fetchpool_and_ask_for_identity(origin: Origin, tmp_path: Path) -> None:
    download([origin.image_url(1)], tmp_path / "out", **LOOPBACK)
    (request,) = origin.requests("/img/")
    assert request.headers["user-agent"].startswith("fetchpool/")
    assert request.headers["accept-encoding"] == "identity"


def test_404_is_not_retried_and_its_page_is_not_saved(origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = download([origin.url("/status/404")], out, **LOOPBACK)
    (record,) = report.records()
    assert record.status is Status.FAILED and record.error_code is ErrorCode.HTTP_ERROR
    assert record.http_status == 404 and record.attempts == 1
    assert len(origin.requests("/status/")) == 1
    assert final_files(out) == []


def test_503_then_200_is_retried_to_success(origin: Origin, tmp_path: Path) -> None:
    report = download(
        [origin.url("/flaky/a/2/503")], tmp_path / "out", backoff_base=0.05, **LOOPBACK
    )
    (record,) = report.records()
    assert record.status is Status.OK and record.attempts == 3
    assert len(origin.requests("/flaky/")) == 3


def test_429_retry_after_is_honoured(origin: Origin, tmp_path: Path) -> None:
    report = download([origin.url("/retry-after/k/1")], tmp_path / "out", **LOOPBACK)
    (record,) = report.records()
    assert record.status is Status.OK and record.attempts == 2
    first, second = origin.requests("/retry-after/")
    assert second.time - first.time >= 0.9


def test_idle_timeout_fails_the_item_without_a_file(origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = download([origin.url("/hang")], out, read_timeout=0.5, attempts=1, **LOOPBACK)
    (record,) = report.records()
    assert record.error_code is ErrorCode.READ_TIMEOUT
    assert final_files(out) == []


def test_truncated_body_fails_and_leaves_no_file(origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = download([origin.url("/truncated")], out, attempts=2, backoff_base=0.01, **LOOPBACK)
    (record,) = report.records()
    assert record.error_code is ErrorCode.INCOMPLETE_BODY and record.attempts == 2
    assert final_files(out) == []
    assert not list((out / ".fetchpool" / "tmp").iterdir())


def test_redirect_chain_is_followed_and_recorded(origin: Origin, tmp_path: Path) -> None:
    report = download([origin.url("/redirect/3")], tmp_path / "out", **LOOPBACK)
    (record,) = report.records()
    assert record.status is Status.OK and len(record.redirects) == 3
    assert record.final_url is not None and "/img/" in record.final_url


def test_redirect_loop_fails(origin: Origin, tmp_path: Path) -> None:
    report = download([origin.url("/redirect-loop")], tmp_path / "out", **LOOPBACK)
    (record,) = report.records()
    assert record.error_code is ErrorCode.TOO_MANY_REDIRECTS


def test_bad_lines_fail_with_their_line_number_and_the_run_goes_on(
    origin: Origin, tmp_path: Path
) -> None:
    src = tmp_path / "urls.txt"
    src.write_text(
        "# a comment\n"
        f"{origin.image_url(1)}\n"
        "\n"
        "file:///etc/passwd\n"
        "ftp://example.com/a.jpg\n"
        "http://example.com:99999/x\n"
        f"{origin.image_url(2)}\n"
    )
    report = download(src, tmp_path / "out", **LOOPBACK)
    records = list(report.records())
    assert [(r.line, r.status) for r in records] == [
        (2, "ok"),
        (4, "failed"),
        (5, "failed"),
        (6, "failed"),
        (7, "ok"),
    ]
    assert records[1].error_code is ErrorCode.UNSUPPORTED_SCHEME
    assert records[3].error_code is ErrorCode.INVALID_URL
    assert origin.requests() and all("/img/" in r.path for r in origin.requests())


def test_duplicates_download_once_and_same_basenames_stay_distinct(
    origin: Origin, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    same_name = [origin.url("/img/1.jpg"), origin.url("/img/1.jpg?v=2")]
    report = download([*same_name, same_name[0], same_name[0]], out, **LOOPBACK)
    assert report.ok == 2 and report.skipped == 2
    assert len(origin.requests("/img/")) == 2
    names = [p.name for p in final_files(out)]
    assert len(names) == 2 and all(n.startswith("1-") and n.endswith(".jpg") for n in names)


@pytest.mark.parametrize("fmt", ["txt", "csv", "tsv", "jsonl", "parquet", "txt.gz"])
def test_every_input_format(origin: Origin, tmp_path: Path, fmt: str) -> None:
    urls = [origin.image_url(n) for n in range(3)]
    captions = ["a cat", 'a, quoted "dog"', "ünïcode"]
    path = tmp_path / f"in.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(urls) + "\n")
    elif fmt == "txt.gz":
        path.write_bytes(gzip.compress(("\n".join(urls) + "\n").encode()))
    elif fmt == "csv":
        import csv

        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["caption", "url"])
            w.writerows(zip(captions, urls, strict=True))
    elif fmt == "tsv":
        path.write_text(
            "url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in zip(urls, captions, strict=True))
        )
    elif fmt == "jsonl":
        path.write_text(
            "".join(
                json.dumps({"url": u, "caption": c}) + "\n"
                for u, c in zip(urls, captions, strict=True)
            )
        )
    else:
        pq.write_table(pa.table({"url": urls, "caption": captions}), path)
    report = download(path, tmp_path / "out", **LOOPBACK)
    assert report.ok == 3
    records = sorted(report.records(), key=lambda r: r.position)
    if fmt not in ("txt", "txt.gz"):
        assert [r.meta["caption"] for r in records] == captions


def test_webdataset_output_keeps_input_columns(origin: Origin, tmp_path: Path) -> None:
    import tarfile

    rows = [{"url": origin.image_url(n), "caption": f"image {n}"} for n in range(5)]
    out = tmp_path / "out"
    report = download(rows, out, format="webdataset", shard_size=2, **LOOPBACK)
    assert report.ok == 5
    shards = sorted(out.glob("*.tar"))
    assert [s.name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    metas = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    data = tar.extractfile(member)
                    assert data is not None
                    metas.append(json.loads(data.read()))
    assert sorted(m["caption"] for m in metas) == [f"image {n}" for n in range(5)]


def test_resize_runs_in_the_process_pool(origin: Origin, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "out"
    urls = [origin.image_url(n) for n in range(4)] + [origin.url("/html")]
    report = download(
        urls, out, resize=64, resize_mode="center-crop", encode="jpeg", processes=2, **LOOPBACK
    )
    assert report.ok == 4 and report.errors == {"not_an_image": 1}
    for record in report.records(Status.OK):
        assert record.path is not None
        with Image.open(out / record.path) as img:
            assert img.size == (64, 64) and img.format == "JPEG"
        assert (record.width, record.height) == (64, 64)
    # What was downloaded and what was written are both kept (issue 11): the summary's
    # "downloaded" counts the fetched bytes, the record says both.
    fetched = {n: origin.image_bytes(n) for n in range(4)}
    assert report.bytes == sum(len(b) for b in fetched.values())
    for record in report.records(Status.OK):
        body = fetched[int(record.url.rsplit("/", 1)[1].split(".")[0])]
        assert record.fetched_bytes == len(body) and record.fetched_sha256 == sha(body)
        written = (out / (record.path or "")).read_bytes()
        assert record.bytes == len(written) < len(body) and record.sha256 == sha(written)


def test_loopback_is_blocked_unless_allowed(origin: Origin, tmp_path: Path) -> None:
    report = download([origin.image_url(1)], tmp_path / "out")
    (record,) = report.records()
    assert record.error_code is ErrorCode.BLOCKED_ADDRESS
    assert "--allow-private-networks" in (record.error_message or "")
    assert origin.requests() == []


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fmt", ["files", "webdataset"])
def test_every_engine_gives_the_same_result(
    origin: Origin, tmp_path: Path, fmt: str, engine: str
) -> None:
    out = tmp_path / "out"
    urls = [origin.image_url(n) for n in range(30)] + [origin.url("/status/404")]
    report = download(urls, out, threads=8, engine=engine, format=fmt, shard_size=7, **LOOPBACK)
    assert report.ok == 30 and report.errors == {"http_error": 1}
    workers = {r.worker for r in report.records(Status.OK)}
    assert workers and all(w and w.startswith("fetch") for w in workers)
    if fmt == "files":
        for record in report.records(Status.OK):
            assert record.path is not None
            assert sha((out / record.path).read_bytes()) == sha(origin.image_bytes(record.position))
    else:
        assert len(list(out.glob("*.tar"))) == 5
    assert not list((out / ".fetchpool" / "tmp").iterdir())
    # Resume works the same: nothing is fetched again.
    before = len(origin.requests("/img/"))
    again = download(urls, out, threads=8, engine=engine, format=fmt, shard_size=7, **LOOPBACK)
    assert again.resumed == 31 and len(origin.requests("/img/")) == before


def test_a_dead_fetch_worker_costs_only_its_items(tmp_path: Path) -> None:
    import multiprocessing
    import signal

    from fetchpool.config import Options
    from fetchpool.engine.pipeline import Pipeline

    with Origin(latency=0.3) as slow:
        urls = [slow.image_url(n) for n in range(40)]
        pipeline = Pipeline(
            tmp_path / "out",
            Options.from_kwargs(threads=4, per_host=4, fetch_processes=2, **LOOPBACK),
        )
        killed: list[int] = []

        class KillOneWorker:
            def on_event(self, event: object) -> None:
                if killed:
                    return
                # Only a fetch worker: another test's child may still be exiting.
                children = [
                    child
                    for child in multiprocessing.active_children()
                    if child.name.startswith("fetchpool-fetch-")
                ]
                if children:
                    pid = children[0].pid
                    assert pid is not None
                    killed.append(pid)
                    os.kill(pid, signal.SIGKILL)

        pipeline._observers.add(KillOneWorker())
        report = pipeline.run(urls)
    assert killed
    assert report.items == 40
    # Only the jobs running in the dead worker fail: at most its 2 threads' worth (4 threads
    # over 2 processes). Jobs dispatched to it after its death, which never started, go to
    # the live worker (they used to cascade: a dead worker looks the least busy).
    assert report.failed <= 2 and report.ok == 40 - report.failed
    assert set(report.errors) <= {"internal_error"}


@pytest.mark.parametrize("fmt", ["files", "webdataset"])
def test_each_published_file_is_fsynced_once_and_shard_inputs_never(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """Files output: the fetch thread fsyncs the body it wrote, and the writer does not fsync
    it again. Shards: the temp files are read into the shard, never fsynced themselves."""
    import stat

    real_fsync = os.fsync
    regular: list[int] = []

    def counting_fsync(fd: int) -> None:
        # Bodies and shards only: the journal is fsynced once when it is created.
        journal = os.readlink(f"/proc/self/fd/{fd}").endswith(".db.new")
        if stat.S_ISREG(os.fstat(fd).st_mode) and not journal:
            regular.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    urls = [origin.image_url(n) for n in range(10)]
    report = download(urls, tmp_path / "out", threads=4, format=fmt, **LOOPBACK)
    assert report.ok == 10
    if fmt == "files":
        assert len(regular) == 10
    else:  # the shard itself is fsynced when it is closed
        assert 1 <= len(regular) < 10


def test_a_stall_before_the_head_and_one_in_the_body_are_told_apart(
    origin: Origin, tmp_path: Path
) -> None:
    """Both are total_timeout, but they call for different actions (an overloaded server, a
    slow transfer): the message and the summary say which."""
    from fetchpool.report.summary import outcome_rows

    urls = [origin.url("/drip?bytes=100&interval=0.3"), origin.url("/img/1.jpg?latency=3")]
    report = download(urls, tmp_path / "out", total_timeout=1.5, read_timeout=5, attempts=1,
                      **LOOPBACK)  # fmt: skip
    body, head = sorted(report.records(), key=lambda r: r.position)
    assert body.error_code is head.error_code is ErrorCode.TOTAL_TIMEOUT
    assert (body.error_message or "").endswith("while the body was arriving")
    assert (head.error_message or "").endswith("before the server answered")
    assert report.breakdown == {"total_timeout": {"in the body": 1, "no response": 1}}
    rows = dict(outcome_rows(report))
    assert rows["total_timeout (in the body)"] == rows["total_timeout (no response)"] == 1


def test_a_host_many_others_redirect_to_keeps_its_per_host_limit(tmp_path: Path) -> None:
    """Ten hosts each redirect to one CDN: the CDN sees at most --per-host requests at once
    (the attempt goes on queued under the CDN's host, not under the host it started on)."""
    import urllib.parse

    from reliability_helpers import require_loopback_address

    require_loopback_address("127.0.0.12")
    per_host, latency = 2, 0.25
    cdn = Origin(host="127.0.0.2", latency=latency).start()
    front = [Origin(host=f"127.0.0.{3 + i}").start() for i in range(10)]
    try:
        urls = []
        for i in range(40):
            target = urllib.parse.quote(cdn.image_url(i, small=True), safe="")
            urls.append(front[i % 10].url(f"/redirect-to?url={target}"))
        report = download(urls, tmp_path / "out", threads=16, per_host=per_host, **LOOPBACK)
        assert report.ok == 40, report.errors
        starts = sorted(r.time for r in cdn.requests("/small/"))
        assert len(starts) == 40
        # Each CDN request takes `latency`: more than per_host starting within one latency
        # window means more than per_host were in flight there at once.
        busiest = max(sum(1 for t in starts if s <= t < s + latency * 0.8) for s in starts)
        assert busiest <= per_host, busiest
        records = list(report.records())
        assert all(r.attempts == 1 and len(r.redirects) == 1 for r in records)
        assert all(r.final_url and r.final_url.startswith(cdn.url("/small/")) for r in records)
    finally:
        for origin in [cdn, *front]:
            origin.stop()
