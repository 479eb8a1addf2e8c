"""The lab: every scenario runs at a small scale; ordering claims exact, timing bounds generous."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from fetchpool.lab import SCENARIOS, Result, Verdict, cpu_verdict, resolve, run_scenarios
from fetchpool.lab.cli import lab_command
from fetchpool.lab.report import write_report

SCALE = 0.05


@pytest.fixture(scope="module")
def results() -> dict[str, Result]:
    """Every scenario once (about ten seconds in all), shared by the tests below."""
    return {r.name: r for r in run_scenarios(SCENARIOS.values(), SCALE)}


def test_registry_matches_the_notebook() -> None:
    assert [s.number for s in SCENARIOS.values()] == list(range(1, 15))
    assert list(SCENARIOS)[8:10] == ["as-completed-order", "map-order"]
    assert [s.name for s in resolve(["9", "map-order"])] == ["as-completed-order", "map-order"]
    with pytest.raises(KeyError):
        resolve(["no-such"])
    with pytest.raises(ValueError, match="scale"):
        run_scenarios([], 0)


def test_every_result_is_complete(results: dict[str, Result]) -> None:
    assert set(results) == set(SCENARIOS)
    for name, r in results.items():
        assert r.claim == SCENARIOS[name].claim and r.figures
        assert r.verdict.text in ("holds", "does not hold here") and r.verdict.reason


def test_every_svg_parses_with_one_bar_per_task(results: dict[str, Result]) -> None:
    for r in results.values():
        root = ET.fromstring(r.svg())
        bars = [e for e in root.iter() if e.get("class") == "bar"]
        assert len(bars) == len(r.tasks), r.name


def test_ordering_claims_are_exact(results: dict[str, Result]) -> None:
    assert results["as-completed-order"].order == ["1", "2", "3", "4", "5"]
    assert results["map-order"].order == ["5", "4", "3", "2", "1"]
    for name in ("as-completed-order", "map-order"):
        assert results[name].verdict.holds
        assert results[name].value("wall") < 0.9 * (5 + 4 + 3 + 2 + 1) * SCALE


def test_sequential_versus_threads(results: dict[str, Result]) -> None:
    ten = results["ten-tasks"]
    assert ten.value("sequential") >= 0.9 * 10 * SCALE
    assert ten.value("threads") <= 0.5 * 10 * SCALE
    assert results["two-tasks"].value("wall") >= 0.9 * 2 * SCALE
    assert results["start-and-join"].value("wall") <= 0.5 * 2 * SCALE + 0.02
    assert results["with-arguments"].value("wall") <= 0.5 * 10 * 1.5 * SCALE
    submit = results["executor-submit"]
    assert submit.value("two") <= 0.5 * 2 * SCALE + 0.03
    lanes = {t.worker for t in ten.tasks if t.label == "threads"}
    assert len(lanes) == 10


def test_raw_thread_scenarios(results: dict[str, Result]) -> None:
    created = results["created-not-started"]
    assert created.tasks == [] and created.value("ran") == 0 and created.verdict.holds
    not_joined = results["started-not-joined"]
    assert not_joined.value("reported") < not_joined.value("ended")
    assert not_joined.value("ended") >= 0.9 * SCALE
    log = results["logging-thread"]
    assert log.verdict.holds
    assert log.order is not None
    assert log.order.index("Main    : all done") < log.order.index("Thread 1: finishing")
    assert any("[MainThread]" in line for line in log.log)


def test_downloads_from_the_embedded_origin(results: dict[str, Result]) -> None:
    d = results["download-images"]
    # 15 x 20 ms of latency in a loop, against three waves on the pool.
    assert d.value("sequential") >= 0.9 * 15 * d.value("latency")
    assert d.value("threads") <= 0.5 * d.value("sequential")
    assert d.verdict.holds
    zero = results["zero-latency-downloads"]
    assert zero.value("count") >= 150 and zero.value("cpu_ms") > 0
    labels = {t.label for t in zero.tasks}
    assert labels == {"sequential", "threads"}


def test_cpu_bound_reports_its_build(results: dict[str, Result]) -> None:
    cpu = results["cpu-bound"]
    assert {"sequential", "threads", "processes", "cores"} <= {f.key for f in cpu.figures}
    assert any("GIL" in note for note in cpu.notes)
    assert {t.label for t in cpu.tasks} == {"sequential", "threads", "processes"}
    assert any(t.worker.startswith("pid-") for t in cpu.tasks)


@pytest.mark.parametrize(
    ("seq", "threads", "procs", "cores", "gil", "holds", "words"),
    [
        (4.0, 4.1, 2.05, 2, True, True, "processes used the cores"),
        (4.0, 4.0, 2.1, 2, None, True, "processes used the cores"),
        (4.0, 4.4, 4.0, 1, True, True, "one core"),
        (4.0, 4.0, 3.9, 4, True, False, "did not use"),
        (4.0, 1.1, 1.0, 4, True, False, "despite the GIL"),
        (4.0, 1.1, 1.0, 4, False, False, "free-threaded"),
        (4.0, 3.9, 1.0, 4, False, True, "no speedup"),
    ],
)
def test_cpu_verdict_from_injected_numbers(
    seq: float, threads: float, procs: float, cores: int, gil: bool | None, holds: bool, words: str
) -> None:
    verdict = cpu_verdict(seq, threads, procs, cores, gil, tasks=4)
    assert isinstance(verdict, Verdict)
    assert verdict.holds is holds
    assert words in verdict.reason


def test_cpu_verdict_scales_with_task_count() -> None:
    # 8 cores but only 2 tasks: a 1.9x process gain is all that is possible.
    assert cpu_verdict(2.0, 2.0, 1.05, 8, True, tasks=2).holds
    assert not cpu_verdict(2.0, 2.0, 1.05, 8, True).holds  # judged against 8 cores


def test_report_page_links_every_picture(results: dict[str, Result], tmp_path: Path) -> None:
    index = write_report(list(results.values()), tmp_path / "report", scale=SCALE)
    page = index.read_text(encoding="utf-8")
    assert index.name == "index.html"
    for name in SCENARIOS:
        svg = tmp_path / "report" / f"{name}.svg"
        ET.parse(svg)
        assert f'<img src="{name}.svg"' in page and f'<a href="{name}.svg">' in page
        assert f'id="{name}"' in page
    assert "does not hold here" in page or "holds" in page


def test_cli_list_and_errors() -> None:
    runner = CliRunner()
    listed = runner.invoke(lab_command, ["--list"])
    assert listed.exit_code == 0
    assert "as-completed-order" in listed.output and "zero-latency-downloads" in listed.output
    bad = runner.invoke(lab_command, ["nope"])
    assert bad.exit_code == 2 and "unknown scenario" in bad.output
    assert runner.invoke(lab_command, ["--scale", "0", "1"]).exit_code == 2


def test_cli_runs_scenarios_and_writes_report(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "rep"
    result = runner.invoke(lab_command, ["9", "map-order", "--scale", "0.02", "--report", str(out)])
    assert result.exit_code == 0, result.output
    assert "as-completed-order" in result.output and "Summary" in result.output
    assert "1 -> 2 -> 3 -> 4 -> 5" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "as-completed-order.svg",
        "index.html",
        "map-order.svg",
    ]
