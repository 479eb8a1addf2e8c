"""The command line as users meet it: a real subprocess against the embedded origin."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fetchpool.origin import Origin

CLI = [sys.executable, "-m", "fetchpool"]


def fetchpool(
    *args: str | Path, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def url_file(path: Path, urls: list[str]) -> Path:
    path.write_text("".join(u + "\n" for u in urls))
    return path


def out_files(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name != ".fetchpool")


def test_get_downloads_and_exits_0(origin: Origin, tmp_path: Path) -> None:
    src = url_file(tmp_path / "urls.txt", [origin.image_url(n) for n in range(5)])
    result = fetchpool("get", src, "-o", tmp_path / "out", "--allow-private-networks")
    assert result.returncode == 0, result.stderr
    assert "Finished 5 items" in result.stderr and "concurrency gain" in result.stderr
    assert len(out_files(tmp_path / "out")) == 5


def test_stdin_input(origin: Origin, tmp_path: Path) -> None:
    data = "".join(origin.image_url(n) + "\n" for n in range(3)).encode()
    result = fetchpool(
        "get", "-", "-o", tmp_path / "out", "--allow-private-networks", "-q", stdin=data
    )
    assert result.returncode == 0, result.stderr
    assert len(out_files(tmp_path / "out")) == 3
    assert result.stderr == ""  # --quiet


def test_some_failures_exit_1_and_manifest_lists_them(origin: Origin, tmp_path: Path) -> None:
    src = url_file(
        tmp_path / "urls.txt", [origin.image_url(1), origin.url("/status/410"), "ftp://x/y"]
    )
    out = tmp_path / "out"
    assert fetchpool("get", src, "-o", out, "--allow-private-networks", "-q").returncode == 1
    result = fetchpool("manifest", out, "--format", "csv", "--status", "failed")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert sorted(r["error_code"] for r in rows) == ["http_error", "unsupported_scheme"]
    jsonl = fetchpool("manifest", out).stdout.splitlines()
    assert [json.loads(line)["status"] for line in jsonl] == ["ok", "failed", "failed"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threads", "0"], "threads"),
        (["--max-bytes", "lots"], "size"),
        (["--allow-cidr", "not-a-net"], "CIDR"),
    ],
)
def test_bad_options_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    src = url_file(tmp_path / "urls.txt", ["http://example.com/a.jpg"])
    result = fetchpool("get", src, "-o", tmp_path / "out", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_unreadable_input_and_unusable_output_exit_2(tmp_path: Path) -> None:
    missing = fetchpool("get", tmp_path / "nope.txt", "-o", tmp_path / "out")
    assert missing.returncode == 2 and "nope.txt" in missing.stderr
    src = url_file(tmp_path / "urls.txt", ["http://example.com/a.jpg"])
    (tmp_path / "afile").write_text("x")
    is_file = fetchpool("get", src, "-o", tmp_path / "afile")
    assert is_file.returncode == 2
    no_parent = fetchpool("get", src, "-o", tmp_path / "no" / "parent" / "out")
    assert no_parent.returncode == 2
    assert not (tmp_path / "no").exists()


def _start(args: list[str | Path]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_rows(out: Path, rows: int, timeout: float = 30) -> None:
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        db = out / ".fetchpool" / "state.db"
        if db.exists():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                    if conn.execute("select count(*) from records").fetchone()[0] >= rows:
                        return
            except sqlite3.Error:
                pass
        time.sleep(0.05)
    raise AssertionError(f"journal never reached {rows} rows")


@pytest.mark.slow
def test_sigint_exits_130_and_the_next_run_resumes(tmp_path: Path) -> None:
    with Origin(latency=0.05) as origin:
        urls = [origin.image_url(n) for n in range(300)]
        src = url_file(tmp_path / "urls.txt", urls)
        out = tmp_path / "out"
        args: list[str | Path] = [
            "get",
            src,
            "-o",
            out,
            "--allow-private-networks",
            "--threads",
            "4",
            "--per-host",
            "4",
        ]
        proc = _start(args)
        _wait_for_rows(out, 20)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "interrupted" in err
        first_requests = len(origin.requests("/img/"))
        assert first_requests < 300
        second = fetchpool(*args, "-q")
        assert second.returncode == 0, second.stderr
        # Only what the first run had not finished was fetched again (give or take the
        # items in flight at the signal, which finish before exit).
        assert len(origin.requests("/img/")) <= 300 + 4
        files = out_files(out)
        assert len(files) == 300
        expected = {hashlib.sha256(origin.image_bytes(n)).hexdigest() for n in range(300)}
        assert {hashlib.sha256(f.read_bytes()).hexdigest() for f in files} == expected
        assert not list((out / ".fetchpool" / "tmp").iterdir())


@pytest.mark.slow
def test_a_second_run_on_the_same_output_is_refused(tmp_path: Path) -> None:
    with Origin(latency=0.2) as origin:
        src = url_file(tmp_path / "urls.txt", [origin.image_url(n) for n in range(100)])
        out = tmp_path / "out"
        args: list[str | Path] = [
            "get",
            src,
            "-o",
            out,
            "--allow-private-networks",
            "--threads",
            "2",
            "-q",
        ]
        first = _start(args)
        _wait_for_rows(out, 1)
        second = fetchpool(*args)
        assert second.returncode == 2
        assert "locked" in second.stderr.lower() and str(first.pid) in second.stderr
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
        assert first.returncode == 143


def test_timeline_svg_is_written(origin: Origin, tmp_path: Path) -> None:
    src = url_file(
        tmp_path / "urls.txt", [origin.image_url(n) for n in range(8)] + [origin.url("/status/404")]
    )
    svg = tmp_path / "run.svg"
    result = fetchpool(
        "get", src, "-o", tmp_path / "out", "--allow-private-networks", "-q", "--timeline", svg
    )
    assert result.returncode == 1
    root = ET.parse(svg).getroot()
    bars = [e for e in root.iter() if e.get("class") == "bar"]
    assert len(bars) == 9


def test_verbose_log_names_threads_and_redacts_credentials(origin: Origin, tmp_path: Path) -> None:
    secret_url = origin.image_url(1).replace("http://", "http://alice:s3cret@")
    src = url_file(
        tmp_path / "urls.txt",
        [secret_url, origin.url("/status/404").replace("http://", "http://bob:hunter2@")],
    )
    log = tmp_path / "run.log"
    result = fetchpool(
        "get",
        src,
        "-o",
        tmp_path / "out",
        "--allow-private-networks",
        "-q",
        "-v",
        "--log-file",
        log,
    )
    text = log.read_text()
    assert "fetch" in text  # thread names of the fetch pool
    for secret in ("s3cret", "hunter2"):
        assert secret not in text and secret not in result.stderr
    manifest = fetchpool("manifest", tmp_path / "out").stdout
    assert "s3cret" not in manifest and "hunter2" not in manifest


def test_help_is_fast_and_lists_commands() -> None:
    start = time.perf_counter()
    result = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    for command in ("get", "manifest", "demo", "serve", "lab"):
        assert command in result.stdout
    assert elapsed < 5  # generous; the real target (0.3 s) is in the benchmark harness


@pytest.mark.slow
def test_demo_shows_the_thread_pool_is_faster(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "demo", "--count", "8", "--latency", "0.1", "-o", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert result.returncode == 0, result.stderr
    assert "sequential" in result.stdout and "thread pool" in result.stdout
    rows = {
        line.split("│")[1].strip(): line.split("│")
        for line in result.stdout.splitlines()
        if line.startswith("│")
    }
    seq, pool = float(rows["sequential"][4]), float(rows["thread pool"][4])
    assert seq >= 0.8  # 8 requests of 100 ms one after another
    assert pool < seq / 2
    runs = list((tmp_path / "demo").iterdir())
    assert len(runs) == 1 and len(out_files(runs[0] / "thread-pool")) == 8


def test_shards_run_apart_and_their_manifests_merge(origin: Origin, tmp_path: Path) -> None:
    src = url_file(tmp_path / "urls.txt", [origin.image_url(n) for n in range(10)])
    for k in range(3):
        result = fetchpool(
            "get",
            src,
            "-o",
            tmp_path / f"shard{k}",
            "--shard",
            f"{k}/3",
            "--allow-private-networks",
            "-q",
        )
        assert result.returncode == 0, result.stderr
    assert len(origin.requests("/img/")) == 10  # every URL fetched once, by one shard
    merged = fetchpool("manifest", *(tmp_path / f"shard{k}" for k in range(3)))
    rows = [json.loads(line) for line in merged.stdout.splitlines()]
    assert [r["position"] for r in rows] == list(range(10))
    assert all(r["path"].startswith(f"shard{r['position'] % 3}/") for r in rows)
    assert all((tmp_path / r["path"]).is_file() for r in rows)


def test_bad_shard_is_a_usage_error(tmp_path: Path) -> None:
    src = url_file(tmp_path / "urls.txt", ["http://example.com/a.jpg"])
    result = fetchpool("get", src, "-o", tmp_path / "out", "--shard", "3/3")
    assert result.returncode == 2 and "K/N" in result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--threads", "0"], "--threads must be between 1 and 4096"),
        (["--threads", "4", "--fetch-processes", "8"], "--fetch-processes must be between 1"),
        (["--per-host", "0"], "--per-host must be between 1 and 4096"),
        (["--timeout", "0"], "--timeout must be > 0"),
        (["--connect-timeout", "-1"], "--connect-timeout must be > 0"),
        (["--max-redirects", "101"], "--max-redirects must be between 0 and 100"),
        (["--attempts", "0"], "--attempts must be between 1 and 100"),
        (["--resize", "0"], "--resize must be between 1 and 65535"),
        (["--quality", "101"], "--quality must be between 1 and 100"),
        (["--processes", "0"], "--processes must be >= 1"),
    ],
)
def test_bad_numbers_are_refused_in_the_options_words(
    tmp_path: Path, args: list[str], words: str
) -> None:
    src = url_file(tmp_path / "urls.txt", ["http://example.com/a.jpg"])
    out = tmp_path / "out"
    result = fetchpool("get", src, "-o", out, *args)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert not out.exists()  # refused before the output folder is touched


_FULL_DISK_CLI = """
import errno, sys
from fetchpool import fsutil
real_create, real_write = fsutil.create_temp_fd, fsutil.write_all
state = {"files": 0, "doomed": None}
def create_temp_fd(directory, *args):
    fd, path = real_create(directory, *args)
    state["files"] += 1
    if state["files"] == 3:
        state["doomed"] = fd
    return fd, path
def write_all(fd, data):
    if fd == state["doomed"]:
        raise OSError(errno.ENOSPC, "No space left on device")
    real_write(fd, data)
fsutil.create_temp_fd, fsutil.write_all = create_temp_fd, write_all
from fetchpool.cli import main
sys.argv[0] = "fetchpool"
main()
"""


@pytest.mark.parametrize("quiet", [True, False])
def test_a_full_disk_is_said_on_stderr_whatever_the_verbosity(
    origin: Origin, tmp_path: Path, quiet: bool
) -> None:
    """The disk fills up while the third body is written: exit 2 and one clear line on
    stderr, with -q too (it used to exit 2 silently); nothing journaled as disk_full."""
    src = url_file(tmp_path / "urls.txt", [origin.url(f"/bytes/{5000 + i}") for i in range(10)])
    out = tmp_path / "out"
    args = ["get", str(src), "-o", str(out), "--allow-private-networks", "--threads", "1"]
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CLI, *args, *(["-q"] if quiet else [])],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "disk_full" in done.stderr and "no space left" in done.stderr.lower()
    if not quiet:
        assert "under way" in done.stderr, "the summary says the item is not lost"
    from fetchpool.state.journal import iter_journal

    assert {r.error_code for r in iter_journal(out)} == {None}
    again = fetchpool("get", src, "-o", out, "--allow-private-networks", "-q")
    assert again.returncode == 0, again.stderr
    assert len([r for r in iter_journal(out) if r.ok]) == 10


def test_the_summary_says_what_to_do_in_unwrapped_lines(origin: Origin, tmp_path: Path) -> None:
    """Blocked by the guard, then allowed: the first summary names the option, the second
    says --retry-failed (the failures were kept); off a terminal nothing is wrapped."""
    src = url_file(tmp_path / "urls.txt", [origin.image_url(n) for n in range(3)])
    out = tmp_path / ("a-long-output-folder-name-" * 4)
    first = fetchpool("get", src, "-o", out)
    assert first.returncode == 1
    assert "blocked_address" in first.stderr and "--allow-private-networks" in first.stderr
    assert f"fetchpool manifest {out} --status failed" in first.stderr
    state_lines = [line for line in first.stderr.splitlines() if line.startswith("output: ")]
    assert state_lines == [f"output: {out}   state: {out / '.fetchpool' / 'state.db'}"]
    gains = [line for line in first.stderr.splitlines() if "concurrency gain" in line]
    assert len(gains) == 1 and gains[0].startswith("0 B downloaded") and gains[0].endswith(" s)")
    second = fetchpool("get", src, "-o", out, "--allow-private-networks")
    assert second.returncode == 1
    assert "3 items failed in an earlier run" in second.stderr and "--retry-failed" in second.stderr
    assert "--allow-private-networks or" not in second.stderr, "no hint for the fixed cause"
    third = fetchpool("get", src, "-o", out, "--allow-private-networks", "--retry-failed")
    assert third.returncode == 0, third.stderr


def test_http_errors_are_split_by_status_in_the_summary(origin: Origin, tmp_path: Path) -> None:
    urls = [origin.url(f"/status/404?n={i}") for i in range(3)]
    urls += [origin.url(f"/status/500?n={i}") for i in range(2)]
    urls += [origin.url("/status/429")]
    src = url_file(tmp_path / "urls.txt", urls)
    done = fetchpool("get", src, "-o", tmp_path / "out", "--allow-private-networks",
                     "--attempts", "1")  # fmt: skip
    assert done.returncode == 1
    rows = {
        line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[1]
        for line in done.stderr.splitlines()
        if line.startswith("http_error")
    }
    assert rows == {"http_error 404": "3", "http_error 500": "2", "http_error 429": "1"}
    assert "lower --per-host or set --rate-per-host" in done.stderr
