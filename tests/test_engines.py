"""The fetch-engine registry and ``--engine``: names, defaults, refusals, and a real run of
every registered backend (the run itself is ``test_download``'s, parametrized over ENGINES)."""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from engines import ENGINES, engine_args
from fetchpool import MockFetcher, MockResponse, download
from fetchpool.config import FetchConfig, Options
from fetchpool.engine.backends import BACKENDS, check_engine
from fetchpool.engine.pipeline import Pipeline
from fetchpool.errors import ConfigError
from fetchpool.models import Job, Status
from fetchpool.origin import Origin


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fetchpool", "get", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_the_registry_names_every_backend_module() -> None:
    assert {"threads", "processes"} <= set(BACKENDS) and set(ENGINES) == set(BACKENDS)
    import importlib

    for name, module in BACKENDS.items():
        loaded = importlib.import_module(module)
        assert callable(loaded.build) and callable(loaded.check_fetcher), name
        check_engine(FetchConfig(engine=name))


def test_an_unknown_engine_is_refused_in_the_clis_words(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"--engine 'warp': choose multiplexed or processes or threads"
    ):
        check_engine(FetchConfig(engine="warp"))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="--engine 'warp'"):
        download(["http://a.example/x.jpg"], out, engine="warp")
    assert not out.exists(), "refused before the output folder is touched"
    result = _cli(tmp_path / "none.txt", "-o", out, "--engine", "warp")
    assert result.returncode == 2 and "--engine" in result.stderr and "warp" in result.stderr


def test_the_default_engine_keeps_every_older_command_meaning() -> None:
    assert (FetchConfig().engine, FetchConfig().fetch_processes) == ("threads", 1)
    assert (
        FetchConfig(fetch_processes=3).engine,
        FetchConfig(fetch_processes=3).fetch_processes,
    ) == ("processes", 3)
    # --engine processes alone: two processes, never more than the threads.
    assert FetchConfig(engine="processes").fetch_processes == 2
    assert FetchConfig(engine="processes", threads=1).fetch_processes == 1
    assert FetchConfig(engine="processes", fetch_processes=1).fetch_processes == 1


def test_threads_with_fetch_processes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--fetch-processes 3 .* --engine processes"):
        Options.from_kwargs(engine="threads", fetch_processes=3)
    result = _cli(tmp_path / "urls.txt", "-o", tmp_path / "out", *engine_args("threads"),
                  "--fetch-processes", "3")  # fmt: skip
    assert result.returncode == 2
    assert "--fetch-processes 3" in result.stderr and "--engine processes" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_engine_processes_downloads_and_is_recorded(origin: Origin, tmp_path: Path) -> None:
    source, out = tmp_path / "urls.txt", tmp_path / "out"
    source.write_text("".join(f"{origin.image_url(n)}\n" for n in range(8)))
    result = _cli(source, "-o", out, "--allow-private-networks", "--threads", "4",
                  *engine_args("processes"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    served = {origin.image_bytes(n) for n in range(8)}
    saved = {p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert saved == served
    with sqlite3.connect(out / ".fetchpool" / "state.db") as db:
        (settings,) = db.execute("SELECT settings FROM runs").fetchone()
    fetch = json.loads(settings)["fetch"]
    assert (fetch["engine"], fetch["fetch_processes"]) == ("processes", 2)


def answer_with_pid(job: Job) -> MockResponse:
    """A module-level handler: it pickles, so a worker process can build a MockFetcher."""
    return MockResponse(
        body=f"{os.getpid()} {job.url}".encode(), headers={"Content-Type": "text/plain"}
    )


def test_a_picklable_custom_fetcher_runs_in_the_worker_processes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    urls = [f"http://a.example/{n}.txt" for n in range(12)]
    report = download(
        urls,
        out,
        engine="processes",
        threads=4,
        fetcher=functools.partial(MockFetcher, answer_with_pid),
    )
    assert report.ok == 12 and report.exit_code == 0
    pids = set()
    for record in report.records(Status.OK):
        pid, url = (out / (record.path or "")).read_text().split(" ")
        assert url == record.url
        pids.add(int(pid))
    assert pids and os.getpid() not in pids


def test_an_unpicklable_custom_fetcher_is_refused_by_the_processes_engine(tmp_path: Path) -> None:
    def factory(tmp: Path) -> MockFetcher:
        return MockFetcher(answer_with_pid, tmp)

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"--engine processes .* cannot be pickled"):
        download(["http://a.example/1.txt"], out, engine="processes", fetcher=factory)
    with pytest.raises(ConfigError, match="cannot be pickled"):
        Pipeline(out, Options.from_kwargs(fetch_processes=2), fetcher=factory)
    assert not out.exists()
    # The default engine runs it in this process, as before.
    assert download(["http://a.example/1.txt"], out, fetcher=factory).ok == 1
