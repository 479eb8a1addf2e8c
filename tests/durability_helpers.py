"""Helpers for ``tests/test_durability.py`` (RELIABILITY.md cases 39-46: kills, signals, resume).

Every ``fetchpool get`` these tests start runs in its own session with an environment variable
:data:`TAG_VAR` set to a per-test tag. Children (fetch workers, CPU-stage workers, the
multiprocessing resource tracker) inherit the environment, so scanning ``/proc/*/environ`` for
the tag finds every process a run left behind, whoever its parent is now.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import tarfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from fetchpool import Origin, Status
from fetchpool.models import Record
from fetchpool.state.journal import iter_journal
from fetchpool.state.manifest import export_manifest
from reliability_helpers import cli, cli_env, final_files, leftovers, sha

TAG_VAR = "FETCHPOOL_TEST_TAG"
FLAGS = ("--allow-private-networks", "-q")
SHARD_SUFFIXES = (".tar", ".parquet")
_SHARD_NAME = re.compile(r"\d{5,}\.(tar|parquet)")
_COMPANION = re.compile(r"\d{5,}_stats\.json")


# -- processes ---------------------------------------------------------------------------------


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment holds ``TAG_VAR=tag`` (never this test process).

    Zombies have an empty environ and do not count; vanished pids and permission errors are
    ignored.
    """
    needle = f"{TAG_VAR}={tag}".encode()
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry))
    return sorted(found)


def wait_no_tagged_processes(tag: str, timeout: float = 10.0) -> list[int]:
    """Poll until no tagged process is left or ``timeout`` passes; return the leftovers."""
    deadline = time.monotonic() + timeout
    while True:
        left = tagged_pids(tag)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def wait_tagged_processes(
    tag: str, at_least: int, *, besides: int, timeout: float = 60.0
) -> list[int]:
    """Poll until at least ``at_least`` tagged processes other than ``besides`` exist."""
    deadline = time.monotonic() + timeout
    while True:
        found = [pid for pid in tagged_pids(tag) if pid != besides]
        if len(found) >= at_least or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def describe(pids: Sequence[int]) -> list[str]:
    """``pid: cmdline`` of each pid, for assertion messages."""
    lines = []
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            raw = b"?"
        text = raw.replace(b"\0", b" ").decode(errors="replace")
        lines.append(f"{pid}: {text[:200]}")
    return lines


def kill_tagged(tag: str) -> None:
    """Clean-up after a failed test: SIGKILL every process this test started (by pid)."""
    for pid in tagged_pids(tag):
        with contextlib.suppress(OSError):  # already gone
            os.kill(pid, signal.SIGKILL)
    wait_no_tagged_processes(tag, 10.0)


def tagged_env(tag: str) -> dict[str, str]:
    env = cli_env()
    env[TAG_VAR] = tag
    return env


def spawn_get(args: Sequence[str], tag: str, **popen: Any) -> subprocess.Popen[Any]:
    """Start ``python -m fetchpool get ARGS --allow-private-networks -q`` in a new session."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen(
        cli("get", *args, *FLAGS), env=tagged_env(tag), start_new_session=True, **popen
    )


def run_get(
    args: Sequence[str], tag: str, *, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """``fetchpool get ARGS`` to completion (tagged, own session), output captured."""
    return subprocess.run(
        cli("get", *args, *FLAGS),
        env=tagged_env(tag),
        start_new_session=True,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_manifest(out: Path, *, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``fetchpool manifest OUT`` (jsonl on stdout)."""
    return subprocess.run(
        cli("manifest", str(out)),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for(
    condition: Callable[[], bool],
    proc: subprocess.Popen[Any],
    timeout: float,
    *,
    interval: float = 0.01,
) -> bool:
    """Poll ``condition()`` until true (True) or ``proc`` exits or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return bool(condition())
        time.sleep(interval)
    return False


# -- inputs ------------------------------------------------------------------------------------


def write_urls(path: Path, urls: Sequence[str]) -> Path:
    path.write_text("".join(f"{u}\n" for u in urls))
    return path


def url_path(url: str) -> str:
    return urllib.parse.urlsplit(url).path


def image_index(url: str) -> int:
    """``n`` of ``.../small/{n}.jpg``."""
    return int(url_path(url).rsplit("/", 1)[1].split(".")[0])


def output_format(args: Sequence[str]) -> str:
    args = list(args)
    return args[args.index("--format") + 1] if "--format" in args else "files"


# -- shards ------------------------------------------------------------------------------------


def key_of(position: int) -> str:
    return f"{position:09d}"


def shard_files(out: Path) -> list[Path]:
    """Every ``*.tar`` / ``*.parquet`` under OUT outside ``.fetchpool`` (temp names excluded),
    except the metadata ``NNNNN.parquet`` beside a ``NNNNN.tar``."""
    return [
        path
        for path in final_files(out)
        if path.suffix in SHARD_SUFFIXES
        and not path.name.startswith(".fp-")
        and not (path.suffix == ".parquet" and path.with_suffix(".tar").exists())
    ]


def metadata_files(out: Path) -> list[Path]:
    """Each shard's metadata: the ``NNNNN.parquet`` beside a tar, or the Parquet shard itself."""
    return [
        path.with_suffix(".parquet") if path.suffix == ".tar" else path for path in shard_files(out)
    ]


def metadata_keys(out: Path) -> Counter[str]:
    """Rows per key over every shard's metadata: samples and failures alike."""
    import pyarrow.parquet as pq

    total: Counter[str] = Counter()
    for path in metadata_files(out):
        total.update(pq.read_table(path, columns=["key"]).column("key").to_pylist())
    return total


def _tar_members(path: Path) -> dict[str, list[bytes]]:
    """Sample key → the image payloads with that key; checks every image has its ``.json``."""
    images: dict[str, list[bytes]] = {}
    metas: Counter[str] = Counter()
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if ext == "json":
                metas[key] += 1
                continue
            body = tar.extractfile(member)
            assert body is not None, (path, member.name)
            images.setdefault(key, []).append(body.read())
    counts = Counter({key: len(found) for key, found in images.items()})
    assert counts == metas, f"{path.name}: image members {counts} vs .json members {metas}"
    return images


def shard_samples(path: Path) -> dict[str, list[bytes]]:
    """Sample key → image bytes of every sample with that key in one shard (tar or parquet)."""
    if path.suffix == ".tar":
        return _tar_members(path)
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["key", "image", "status"])
    found: dict[str, list[bytes]] = {}
    for key, image, status in zip(
        table.column("key").to_pylist(),
        table.column("image").to_pylist(),
        table.column("status").to_pylist(),
        strict=True,
    ):
        if status == "ok":  # the shard also lists the failures of its time (image null)
            found.setdefault(key, []).append(image["bytes"])
    return found


def shard_keys(path: Path) -> Counter[str]:
    """How many samples of each key one shard holds."""
    if path.suffix == ".tar":
        return Counter({key: len(v) for key, v in _tar_members(path).items()})
    return Counter({key: len(images) for key, images in shard_samples(path).items()})


def all_shard_keys(out: Path) -> Counter[str]:
    """Samples per key over every shard in OUT."""
    total: Counter[str] = Counter()
    for path in shard_files(out):
        total.update(shard_keys(path))
    return total


# -- the invariants ----------------------------------------------------------------------------


def stray_temp_files(out: Path) -> list[str]:
    """``.fp-*`` entries anywhere in OUT except inside ``OUT/.fetchpool/tmp/``."""
    tmp = out / ".fetchpool" / "tmp"
    found = []
    for root, dirs, files in os.walk(out):
        if Path(root) == out / ".fetchpool" and "tmp" in dirs:
            dirs.remove("tmp")
        found += [str(Path(root, n)) for n in files + dirs if n.startswith(".fp-")]
    return sorted(p for p in found if not p.startswith(str(tmp) + os.sep))


def manifest_rows(out: Path) -> list[dict[str, Any]]:
    """The manifest of OUT through the library (jsonl), parsed."""
    buffer = io.StringIO()
    count = export_manifest([out], buffer, fmt="jsonl")
    rows = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert len(rows) == count
    return rows


def cli_manifest_rows(out: Path) -> list[dict[str, Any]]:
    """The manifest of OUT through ``fetchpool manifest OUT``, which must exit 0."""
    done = run_manifest(out)
    assert done.returncode == 0, f"fetchpool manifest exited {done.returncode}: {done.stderr}"
    return [json.loads(line) for line in done.stdout.splitlines()]


def assert_has_output(out: Path, fmt: str, record: Record, keys: dict[str, Counter[str]]) -> None:
    """An ``ok`` row's output is there: the file with its bytes, or its key once in its shard.

    ``keys`` caches shard name → key counts between calls.
    """
    assert record.path, record
    if fmt == "files":
        target = out / record.path
        assert target.is_file(), f"ok row without its file: {record}"
        data = target.read_bytes()
        assert len(data) == record.bytes and sha(data) == record.sha256, record
        return
    name, sep, key = record.path.partition("#")
    assert sep and key == key_of(record.position), record
    shard = out / name
    assert shard.is_file(), f"ok row names a missing shard: {record}"
    if name not in keys:
        keys[name] = shard_keys(shard)
    assert keys[name][key] == 1, f"{name} holds key {key} {keys[name][key]} times: {record}"


def check_after_kill(out: Path, fmt: str, *, use_cli: bool = False) -> tuple[int, int]:
    """Every invariant a killed run must leave; returns (ok rows, outputs present).

    The manifest must read whenever ``state.db`` exists, even if the kill came before its
    schema was committed; ``use_cli`` also runs ``fetchpool manifest OUT``.
    """
    if not out.exists():
        return 0, 0
    stray = stray_temp_files(out)
    assert stray == [], f"temp files outside .fetchpool/tmp: {stray}"
    if fmt == "files":
        outputs = len(final_files(out))
    else:
        keys = all_shard_keys(out)
        repeated = {k: n for k, n in keys.items() if n > 1}
        assert not repeated, f"samples present more than once across shards: {repeated}"
        outputs = sum(keys.values())
    if not (out / ".fetchpool" / "state.db").exists():
        return 0, outputs
    rows = manifest_rows(out)
    if use_cli:
        assert len(cli_manifest_rows(out)) == len(rows)
    journal = list(iter_journal(out))
    assert len(journal) == len(rows)
    if fmt != "files":
        # Every journaled row, failures included, is in exactly one shard's metadata (rows
        # of a shard named just before the kill may be there unjournaled: staged, rolled
        # forward by the next open).
        listed = metadata_keys(out)
        twice = {k: n for k, n in listed.items() if n > 1}
        assert not twice, f"rows in more than one shard's metadata: {twice}"
        missing = [r.position for r in journal if listed[key_of(r.position)] != 1]
        assert not missing, f"journaled rows in no shard's metadata: {missing[:20]}"
    cache: dict[str, Counter[str]] = {}
    ok = 0
    for record in journal:
        if record.status is Status.OK:
            assert_has_output(out, fmt, record, cache)
            ok += 1
    return ok, outputs


def _same_image(origin: Origin, url: str, data: bytes, *, resized: bool) -> None:
    if resized:  # re-encoded: the bytes differ from the origin's, but they must decode
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return
    expected = origin.image_bytes(image_index(url), small=True)
    assert sha(data) == sha(expected), f"{url}: bytes differ from the origin's"


def check_complete(origin: Origin, out: Path, fmt: str, count: int, *, resized: bool) -> None:
    """A finished run: one ok row per input row, every output once, right bytes, no temps."""
    rows = list(iter_journal(out))
    statuses = Counter((r.status.value, r.error_code) for r in rows)
    assert [r.position for r in rows] == list(range(count)), statuses
    assert all(r.status is Status.OK for r in rows), statuses
    assert leftovers(out) == [], leftovers(out)
    files = final_files(out)
    if fmt == "files":
        assert len(files) == count, "every file present exactly once"
        by_name = {p.name: p for p in files}
        assert not any("-2." in name for name in by_name), "no duplicate variants"
        for row in rows:
            assert row.path in by_name, row
            _same_image(origin, row.url, by_name[row.path].read_bytes(), resized=resized)
        return
    others = [
        p.name
        for p in files
        if not _SHARD_NAME.fullmatch(p.name) and not _COMPANION.fullmatch(p.name)
    ]
    assert others == [], f"files besides the shards and their companions: {others}"
    shards = shard_files(out)
    for shard in shards:
        assert (out / f"{shard.stem}_stats.json").is_file(), f"{shard.name} without its stats"
    samples: dict[str, dict[str, list[bytes]]] = {p.name: shard_samples(p) for p in shards}
    keys: Counter[str] = Counter()
    for found in samples.values():
        keys.update({key: len(v) for key, v in found.items()})
    repeated = {k: n for k, n in keys.items() if n != 1}
    assert not repeated, f"samples not present exactly once: {repeated}"
    assert set(keys) == {key_of(p) for p in range(count)}
    for row in rows:
        name, _, key = (row.path or "").partition("#")
        assert key == key_of(row.position) and key in samples.get(name, {}), row
        _same_image(origin, row.url, samples[name][key][0], resized=resized)
