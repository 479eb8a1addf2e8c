"""Timeline SVGs: valid XML, one bar per task, one lane per worker, bounded when huge."""

from __future__ import annotations

import random
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path

from fetchpool.events import ItemFinished, RunFinished, RunStarted
from fetchpool.models import ErrorCode, Record, Status, TaskRecord
from fetchpool.report.timeline import TimelineObserver, timeline_svg

NS = "{http://www.w3.org/2000/svg}"


def classes(root: ET.Element, name: str) -> list[ET.Element]:
    return [e for e in root.iter() if e.get("class") == name]


def make_tasks(n: int, workers: int, *, fail_every: int = 0, seed: int = 0) -> list[TaskRecord]:
    rng = random.Random(seed)
    clocks = [0.0] * workers
    tasks = []
    for i in range(n):
        w = i % workers
        start = clocks[w] + rng.uniform(0, 0.002)
        end = start + rng.uniform(0.001, 0.02)
        clocks[w] = end
        ok = not (fail_every and i % fail_every == 0)
        tasks.append(TaskRecord(i, start, end, f"thread-{w + 1}", f"t{w}", ok, ""))
    return tasks


def test_one_bar_per_task_and_one_lane_per_worker() -> None:
    tasks = make_tasks(50, 4, fail_every=7)
    root = ET.fromstring(timeline_svg(tasks, title="fifty"))
    assert root.tag == f"{NS}svg"
    assert len(classes(root, "bar")) == 50
    lanes = classes(root, "lane")
    assert len(lanes) == 4
    assert {lane.get("data-worker") for lane in lanes} == {f"thread-{i}" for i in range(1, 5)}
    assert not classes(root, "note")
    fills = [bar.get("fill") for bar in classes(root, "bar")]
    assert fills.count("#d62728") == len([t for t in tasks if not t.ok])


def test_lanes_sorted_by_first_start() -> None:
    tasks = [
        TaskRecord(0, 0.5, 0.6, "late", "a"),
        TaskRecord(1, 0.1, 0.2, "early", "b"),
        TaskRecord(2, 0.3, 0.4, "middle", "c"),
    ]
    root = ET.fromstring(timeline_svg(tasks, title="order"))
    assert [g.get("data-worker") for g in classes(root, "lane")] == ["early", "middle", "late"]


def test_escaping_and_colors_by_label() -> None:
    tasks = [
        TaskRecord(0, 0.0, 1.0, 'w<1>&"x"', "t", True, "sequential"),
        TaskRecord(1, 0.0, 1.0, "w2\x00", "t", True, "threads <&>"),
        TaskRecord(2, 1.0, 2.0, "w2\x00", "t", False, "threads <&>"),
    ]
    svg = timeline_svg(tasks, title='a <b> & "c"', colors={"sequential": "#123456"})
    root = ET.fromstring(svg)
    fills = {
        lane.get("data-worker"): [b.get("fill") for b in classes(lane, "bar")]
        for lane in classes(root, "lane")
    }
    assert fills['w<1>&"x"'] == ["#123456"]
    threads_color, failed_color = fills["w2?"]
    assert failed_color == "#d62728"
    assert threads_color not in ("#123456", "#d62728")
    title = next(e for e in root.iter() if e.get("class") == "title")
    assert title.text == 'a <b> & "c"'
    legend = "".join(root.find(f"{NS}g[@class='legend']").itertext())  # type: ignore[union-attr]
    assert "sequential" in legend and "threads <&>" in legend and "failed" in legend


def test_time_axis_has_ticks_in_seconds() -> None:
    tasks = [TaskRecord(0, 100.0, 101.0, "w", "t"), TaskRecord(1, 100.5, 103.0, "w", "t")]
    root = ET.fromstring(timeline_svg(tasks, title="axis"))
    axis = root.find(f"{NS}g[@class='axis']")
    assert axis is not None
    labels = [t.text for t in axis.iter(f"{NS}text")]
    assert labels[0] == "0.0" and "time (s)" in labels and len(labels) >= 4
    assert "3.0" in labels  # relative to the first start, not the raw clock


def test_origin_keeps_zero_at_pool_creation() -> None:
    tasks = [TaskRecord(0, 1.0, 2.0, "w", "t")]
    root = ET.fromstring(timeline_svg(tasks, title="origin", origin=0.0))
    (bar,) = classes(root, "bar")
    assert float(bar.get("x", "0")) > 130 + 300  # starts about halfway along the plot


def test_empty_and_zero_length() -> None:
    ET.fromstring(timeline_svg([], title="nothing"))
    root = ET.fromstring(timeline_svg([TaskRecord(0, 1.0, 1.0, "w", "t")], title="instant"))
    assert len(classes(root, "bar")) == 1


def test_huge_input_is_aggregated_and_bounded() -> None:
    tasks = make_tasks(100_000, 8, fail_every=50)
    svg = timeline_svg(tasks, title="huge", max_bars=2000)
    assert len(svg.encode()) < 1_000_000
    root = ET.fromstring(svg)
    assert not classes(root, "bar")
    agg = classes(root, "agg")
    assert 0 < len(agg) <= 2000
    assert len(classes(root, "lane")) == 8
    (note,) = classes(root, "note")
    assert note.text == f"100,000 tasks shown as {len(agg):,} aggregated bars"


def test_at_the_cap_stays_exact() -> None:
    tasks = make_tasks(300, 3)
    root = ET.fromstring(timeline_svg(tasks, title="cap", max_bars=300))
    assert len(classes(root, "bar")) == 300
    root = ET.fromstring(timeline_svg(tasks, title="cap", max_bars=299))
    assert not classes(root, "bar") and classes(root, "note")


def test_many_workers_are_capped() -> None:
    tasks = [TaskRecord(i, float(i), i + 0.5, f"w{i}", "t") for i in range(500)]
    root = ET.fromstring(timeline_svg(tasks, title="wide"))
    lanes = classes(root, "lane")
    assert len(lanes) == 200
    assert lanes[-1].get("data-worker") == "301 other workers"
    assert len(classes(root, "bar")) == 500


# -- the observer ---------------------------------------------------------------------------------


def record(i: int, worker: str, start: float, end: float, ok: bool = True) -> Record:
    rec = Record(i, f"http://example.test/{i}", started=start, finished=end, worker=worker)
    if ok:
        rec.status = Status.OK
    else:
        rec.fail(ErrorCode.HTTP_ERROR, "404")
    return rec


def test_observer_small_run_is_exact(tmp_path: Path) -> None:
    obs = TimelineObserver(title="small")
    obs.on_event(RunStarted(total=11, out="out"))
    for i in range(10):
        obs.on_event(ItemFinished(record(i, f"thread-{i % 3}", 1e9 + i, 1e9 + i + 0.5, i != 4)))
    obs.on_event(ItemFinished(Record(10, "bad", status=Status.FAILED)))  # never timed
    obs.on_event(RunFinished(wall=10.0, interrupted=False))
    path = tmp_path / "t.svg"
    obs.write(path)
    root = ET.parse(path).getroot()
    assert len(classes(root, "bar")) == 10
    assert len(classes(root, "lane")) == 3
    assert obs.count == 10 and obs.untimed == 1


def test_observer_memory_flat_for_100k_items(tmp_path: Path) -> None:
    def peak(n: int) -> int:
        obs = TimelineObserver(max_bars=500)
        tracemalloc.start()
        t = 0.0
        for i in range(n):
            obs.on_event(ItemFinished(record(i, f"thread-{i % 8}", t, t + 0.01, i % 97 != 0)))
            t += 0.00125
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        path = tmp_path / f"{n}.svg"
        obs.write(path)
        root = ET.parse(path).getroot()
        (note,) = classes(root, "note")
        assert f"{n:,} tasks shown as" in (note.text or "")
        assert len(classes(root, "agg")) <= 500
        assert path.stat().st_size < 1_000_000
        return top

    small, large = peak(10_000), peak(100_000)
    assert large < 1.5 * small + 256 * 1024
