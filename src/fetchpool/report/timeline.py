"""Timeline pictures: one lane per worker, one bar per task, as a self-contained SVG.

The SVG is written as text (no dependency) with every label XML-escaped. Pictures stay
bounded whatever the input: above ``max_bars`` tasks, each lane is cut into time buckets and
each bucket becomes one bar whose height is the share of the bucket the worker was busy and
whose colour runs from green to red with the share of failed tasks; the picture says so.

:class:`TimelineObserver` builds the same picture from a run's events while keeping memory
flat: it keeps the records only until there are more than ``max_bars``, and always a fixed
grid of buckets per worker.
"""

from __future__ import annotations

import math
import re
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from fetchpool.events import Event, ItemFinished, RunFinished
from fetchpool.models import Record, Status, TaskRecord

__all__ = ["TimelineObserver", "timeline_svg"]

OK_COLOR = "#2ca02c"
FAILED_COLOR = "#d62728"
SKIPPED_COLOR = "#9e9e9e"
# Used for ok tasks' labels when there are few distinct ones (a handful of categories).
PALETTE = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
MAX_LANES = 200  # more workers than this are merged into one last lane
BUCKETS_PER_LANE = 512  # the observer's grid resolution (memory: lanes x this x 3 numbers)

WIDTH = 1000
LEFT = 130
RIGHT = 24
TOP = 56
PLOT_W = WIDTH - LEFT - RIGHT

_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _text(value: object) -> str:
    """Escape for XML character data; drop characters XML 1.0 cannot carry at all."""
    return escape(_INVALID_XML.sub("?", str(value)))


def _attr(value: object) -> str:
    return quoteattr(_INVALID_XML.sub("?", str(value)))


def _num(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


@dataclass(slots=True)
class _Bar:
    lane: int
    start: float
    end: float
    color: str
    css: str  # "bar" for one task, "agg" for an aggregated bucket
    tip: str
    fill: float = 1.0  # share of the lane height (aggregated: busy share of the bucket)


@dataclass(slots=True)
class _Picture:
    title: str
    lanes: list[str]
    bars: list[_Bar]
    t0: float
    t1: float
    subtitle: str = ""
    note: str = ""
    legend: list[tuple[str, str]] = field(default_factory=list)


# -- the bucket grid ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Lane:
    first: float
    # Counts are kept as doubles too: one typecode keeps the merge/shift code uniform.
    busy: array[float]
    count: array[float]
    failed: array[float]


def _zeros(n: int) -> array[float]:
    return array("d", bytes(8 * n))


class _Buckets:
    """Per-lane busy time, task count and failures on one shared grid of ``n`` time buckets.

    The grid grows by doubling its bucket width (merging neighbours) to the right or the left
    as tasks outside it arrive, so it needs no time range up front and never grows in size.
    """

    def __init__(self, n: int, origin: float | None = None, width: float = 1e-3) -> None:
        self.n = max(2, n + n % 2)  # even: doubling merges pairs
        self.origin = origin
        self.width = width
        self.lanes: dict[str, _Lane] = {}

    def add(self, lane: str, start: float, end: float, ok: bool) -> None:
        end = max(end, start)
        if self.origin is None:
            self.origin = start
        self._cover(start, end)
        data = self.lanes.get(lane)
        if data is None:
            data = self.lanes[lane] = _Lane(start, _zeros(self.n), _zeros(self.n), _zeros(self.n))
        data.first = min(data.first, start)
        first = self._index(start)
        data.count[first] += 1
        data.failed[first] += 0 if ok else 1
        for i in range(first, self._index(end) + 1):
            lo = self.origin + i * self.width
            overlap = min(end, lo + self.width) - max(start, lo)
            if overlap > 0:
                data.busy[i] += overlap

    def _index(self, t: float) -> int:
        assert self.origin is not None
        return min(self.n - 1, max(0, int((t - self.origin) / self.width)))

    def _cover(self, start: float, end: float) -> None:
        assert self.origin is not None
        while start < self.origin:
            self._merge()
            # The merged data fills the first half: move it to the second and extend left.
            half = self.n // 2
            for lane in self.lanes.values():
                for arr in (lane.busy, lane.count, lane.failed):
                    arr[half:] = arr[:half]
                    arr[:half] = _zeros(half)
            self.origin -= half * self.width
        while end > self.origin + self.n * self.width:
            self._merge()

    def _merge(self) -> None:
        half = self.n // 2
        for lane in self.lanes.values():
            for arr in (lane.busy, lane.count, lane.failed):
                merged = [arr[2 * i] + arr[2 * i + 1] for i in range(half)]
                arr[:half] = array("d", merged)
                arr[half:] = _zeros(half)
        self.width *= 2

    def picture(self, title: str, max_bars: int, total: int) -> _Picture:
        """Regroup the grid into at most ``max_bars`` bars over the range that holds data."""
        names = sorted(self.lanes, key=lambda name: self.lanes[name].first)
        used = [
            i
            for i in range(self.n)
            if any(lane.count[i] or lane.busy[i] for lane in self.lanes.values())
        ]
        if self.origin is None or not used:
            return _Picture(title, names, [], 0.0, 1.0)
        lo, hi = used[0], used[-1] + 1
        per_lane = max(1, min(hi - lo, max_bars // max(1, len(names))))
        bars: list[_Bar] = []
        for row, name in enumerate(names):
            bars.extend(self._lane_bars(row, self.lanes[name], lo, hi, per_lane))
        t0 = self.origin + lo * self.width
        t1 = self.origin + hi * self.width
        note = f"{total:,} tasks shown as {len(bars):,} aggregated bars"
        return _Picture(title, names, bars, t0, t1, note=note, legend=_AGG_LEGEND)

    def _lane_bars(self, row: int, lane: _Lane, lo: int, hi: int, groups: int) -> list[_Bar]:
        assert self.origin is not None
        bars: list[_Bar] = []
        for g in range(groups):
            a = lo + (hi - lo) * g // groups
            b = lo + (hi - lo) * (g + 1) // groups
            busy = sum(lane.busy[a:b])
            count = int(sum(lane.count[a:b]))
            if busy <= 0 and count == 0:
                continue
            failed = int(sum(lane.failed[a:b]))
            start, end = self.origin + a * self.width, self.origin + b * self.width
            share = min(1.0, busy / (end - start))
            tip = f"{count} tasks started, {failed} failed, busy {share:.0%}"
            color = _mix(OK_COLOR, FAILED_COLOR, failed / count if count else 0.0)
            bars.append(_Bar(row, start, end, color, "agg", tip, max(share, 0.05)))
        return bars


_AGG_LEGEND = [
    (OK_COLOR, "busy (bar height = share of the time slice the worker was busy)"),
    (FAILED_COLOR, "redder = more of the tasks started in the slice failed"),
]


def _mix(a: str, b: str, t: float) -> str:
    """Blend two #rrggbb colours; t=0 gives a, t=1 gives b."""
    ca = [int(a[i : i + 2], 16) for i in (1, 3, 5)]
    cb = [int(b[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb, strict=True))


# -- exact pictures --------------------------------------------------------------------------------


def _lane_names(tasks: Iterable[TaskRecord]) -> list[str]:
    first: dict[str, float] = {}
    for task in tasks:
        first[task.worker] = min(first.get(task.worker, task.start), task.start)
    return sorted(first, key=lambda name: (first[name], name))


def _lane_index(names: list[str]) -> tuple[list[str], dict[str, int]]:
    """Lanes in display order; workers beyond MAX_LANES share one last lane."""
    if len(names) <= MAX_LANES:
        return names, {name: i for i, name in enumerate(names)}
    kept = names[: MAX_LANES - 1]
    index = {name: i for i, name in enumerate(kept)}
    rest = len(names) - len(kept)
    for name in names[len(kept) :]:
        index[name] = len(kept)
    return [*kept, f"{rest} other workers"], index


def _colorer(tasks: Sequence[TaskRecord], colors: Mapping[str, str]) -> dict[str, str]:
    """Colour per ok-task label: given colours first, a palette when labels are few."""
    labels = sorted({t.label for t in tasks if t.ok and t.label and t.label not in colors})
    table = dict(colors)
    if 0 < len(labels) <= len(PALETTE):
        table.update(zip(labels, PALETTE, strict=False))
    return table


def _exact_picture(
    tasks: Sequence[TaskRecord], title: str, colors: Mapping[str, str], origin: float | None
) -> _Picture:
    names, index = _lane_index(_lane_names(tasks))
    t0 = min((t.start for t in tasks), default=0.0) if origin is None else origin
    t1 = max((t.end for t in tasks), default=t0)
    table = _colorer(tasks, colors)
    ok_color = table.get("ok", OK_COLOR)
    failed_color = table.get("failed", FAILED_COLOR)
    bars: list[_Bar] = []
    used: dict[str, str] = {}
    for task in tasks:
        if task.ok:
            key = task.label if task.label in table else "ok"
            color = table.get(key, ok_color)
        else:
            key, color = "failed", failed_color
        used.setdefault(key, color)
        state = "ok" if task.ok else "failed"
        tip = (
            f"#{task.index} {task.label} on {task.worker} ({task.thread}): "
            f"{task.start - t0:.3f}-{task.end - t0:.3f} s, {task.end - task.start:.3f} s, {state}"
        )
        bars.append(_Bar(index[task.worker], task.start, task.end, color, "bar", tip))
    legend = [(color, key) for key, color in used.items()]
    return _Picture(title, names, bars, t0, t1, legend=legend)


def _summary(tasks: Sequence[TaskRecord], t0: float, t1: float) -> str:
    busy = sum(t.end - t.start for t in tasks)
    wall = max(t1 - t0, 0.0)
    workers = len({t.worker for t in tasks})
    gain = f", {busy / wall:.1f}x concurrency" if wall > 0 else ""
    return f"{len(tasks):,} tasks on {workers} workers in {wall:.3f} s; busy {busy:.3f} s{gain}"


def timeline_svg(
    tasks: Sequence[TaskRecord],
    *,
    title: str,
    max_bars: int = 2000,
    colors: Mapping[str, str] | None = None,
    origin: float | None = None,
) -> str:
    """Draw ``tasks`` as an SVG timeline and return the SVG text.

    One lane per worker (ordered by its first start), one ``<rect class="bar">`` per task
    from start to end, a time axis in seconds, lane labels and a legend. Failed tasks are red,
    ok tasks green unless their ``label`` has a colour in ``colors`` (or, with at most a few
    distinct labels, one from a palette). ``origin`` is the time drawn as 0 (default: the
    earliest start). Above ``max_bars`` tasks the picture is aggregated into at most
    ``max_bars`` ``<rect class="agg">`` bars, and says so.
    """
    if len(tasks) > max_bars:
        t0 = min(t.start for t in tasks) if origin is None else origin
        t1 = max(t.end for t in tasks)
        lanes = len(_lane_names(tasks))
        per_lane = max(2, max_bars // max(1, min(lanes, MAX_LANES)))
        grid = _Buckets(per_lane, origin=t0, width=max(t1 - t0, 1e-9) / per_lane * (1 + 1e-9))
        names, index = _lane_index(_lane_names(tasks))
        for task in tasks:
            grid.add(names[index[task.worker]], task.start, task.end, task.ok)
        picture = grid.picture(title, max_bars, len(tasks))
        if origin is not None:
            picture.t0 = min(picture.t0, origin)
    else:
        picture = _exact_picture(tasks, title, colors or {}, origin)
    picture.subtitle = _summary(tasks, picture.t0, max((t.end for t in tasks), default=0.0))
    return _render(picture)


# -- rendering -----------------------------------------------------------------------------------


def _ticks(t0: float, t1: float, target: int = 8) -> list[float]:
    """Round tick positions (1, 2 or 5 times a power of ten) covering [t0, t1]."""
    span = max(t1 - t0, 1e-9)
    raw = span / target
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(t0 / step) * step
    count = int((t1 - first) / step + 1e-9) + 1
    return [first + i * step for i in range(max(count, 0))]


def _tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return f"{value:.{decimals}f}"


def _render(p: _Picture) -> str:
    t0, t1 = p.t0, p.t1 if p.t1 > p.t0 else p.t0 + 1e-3
    lane_h = 22 if len(p.lanes) <= 40 else max(3, 880 // len(p.lanes))
    axis_y = TOP + len(p.lanes) * lane_h + 6
    legend_y = axis_y + 44
    height = legend_y + 22 * len(_legend_rows(p.legend)) + 10
    scale = PLOT_W / (t1 - t0)

    def x(t: float) -> float:
        return LEFT + (t - t0) * scale

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text class="title" x="{LEFT}" y="20" font-size="15" font-weight="bold">'
        f"{_text(p.title)}</text>",
        f'<text class="subtitle" x="{LEFT}" y="37" fill="#555">{_text(p.subtitle)}</text>',
    ]
    if p.note:
        out.append(f'<text class="note" x="{LEFT}" y="51" fill="#b35900">{_text(p.note)}</text>')
    by_lane: list[list[_Bar]] = [[] for _ in p.lanes]
    for bar in p.bars:
        by_lane[bar.lane].append(bar)
    for row, name in enumerate(p.lanes):
        out.extend(_lane(row, name, by_lane[row], y=TOP + row * lane_h, lane_h=lane_h, x=x))
    out.extend(_axis(t0, t1, axis_y, x))
    out.extend(_legend(p.legend, legend_y))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _short(name: str, limit: int = 18) -> str:
    # The label column is LEFT px wide; the full name stays in data-worker and the tooltip.
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def _lane(
    row: int, name: str, bars: list[_Bar], *, y: float, lane_h: float, x: Callable[[float], float]
) -> list[str]:
    fill = "#f4f4f4" if row % 2 == 0 else "#ffffff"
    bar_h = max(2.0, lane_h - 6)
    out = [
        f'<g class="lane" data-worker={_attr(name)}>',
        f'<rect class="lane-bg" x="{LEFT}" y="{_num(y)}" width="{PLOT_W}" '
        f'height="{_num(lane_h)}" fill="{fill}"/>',
    ]
    if lane_h >= 8:
        out.append(
            f'<text class="lane-label" x="{LEFT - 6}" y="{_num(y + lane_h / 2 + 4)}" '
            f'text-anchor="end">{_text(_short(name))}<title>{_text(name)}</title></text>'
        )
    for bar in bars:
        h = bar_h * bar.fill
        x0 = x(bar.start)
        w = max(0.6, x(bar.end) - x0)  # a zero-length task still shows as a hairline
        # A thin white edge separates back-to-back tasks; aggregated slices need none.
        edge = ' stroke="white" stroke-width="0.3"' if bar.css == "bar" else ""
        out.append(
            f'<rect class="{bar.css}" x="{_num(x0)}" y="{_num(y + 3 + bar_h - h)}" '
            f'width="{_num(w)}" height="{_num(h)}" fill="{bar.color}"{edge}>'
            f"<title>{_text(bar.tip)}</title></rect>"
        )
    out.append("</g>")
    return out


def _axis(t0: float, t1: float, y: float, x: Callable[[float], float]) -> list[str]:
    # Labels are seconds since t0: absolute clock readings (1.7e9...) would say nothing.
    ticks = _ticks(0.0, t1 - t0)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else t1 - t0
    out = [
        f'<g class="axis"><line x1="{LEFT}" y1="{_num(y)}" x2="{LEFT + PLOT_W}" y2="{_num(y)}" '
        'stroke="#333"/>'
    ]
    for tick in ticks:
        tx = _num(x(t0 + tick))
        out.append(f'<line x1="{tx}" y1="{_num(y)}" x2="{tx}" y2="{_num(y + 5)}" stroke="#333"/>')
        out.append(
            f'<text x="{tx}" y="{_num(y + 18)}" text-anchor="middle">'
            f"{_tick_label(tick, step)}</text>"
        )
    out.append(
        f'<text x="{LEFT + PLOT_W / 2}" y="{_num(y + 34)}" text-anchor="middle" fill="#555">'
        "time (s)</text></g>"
    )
    return out


def _legend_rows(items: list[tuple[str, str]]) -> list[list[tuple[float, str, str]]]:
    """Flow legend entries left to right, wrapping to a new row when the plot width is used."""
    rows: list[list[tuple[float, str, str]]] = [[]]
    x = 0.0
    for color, text in items:
        width = 17 + 7 * len(text) + 24  # ~7 px per character at font-size 12
        if rows[-1] and x + width > PLOT_W:
            rows.append([])
            x = 0.0
        rows[-1].append((x, color, text))
        x += width
    return rows


def _legend(items: list[tuple[str, str]], y: float) -> list[str]:
    out = ['<g class="legend">']
    for r, row in enumerate(_legend_rows(items)):
        ly = y + r * 22
        for dx, color, text in row:
            lx = LEFT + dx
            out.append(
                f'<rect x="{_num(lx)}" y="{_num(ly)}" width="12" height="12" fill="{color}"/>'
            )
            out.append(f'<text x="{_num(lx + 17)}" y="{_num(ly + 10)}">{_text(text)}</text>')
    out.append("</g>")
    return out


# -- the observer ----------------------------------------------------------------------------------


class TimelineObserver:
    """An :class:`~fetchpool.events.Observer` that draws a run's timeline; memory stays flat.

    It keeps every finished item's timing while there are at most ``max_bars`` of them (an
    exact picture), and always a fixed grid of time buckets per worker, which is what is drawn
    once there are more. Items without a start or end time (skipped, bad input) are counted
    but not drawn.
    """

    def __init__(self, *, title: str = "fetchpool run", max_bars: int = 2000) -> None:
        self.title = title
        self.max_bars = max_bars
        self.count = 0
        self.untimed = 0
        self.wall: float | None = None
        self._tasks: list[TaskRecord] | None = []  # None once there are more than max_bars
        self._grid = _Buckets(BUCKETS_PER_LANE)

    def on_event(self, event: Event) -> None:
        """Record an :class:`ItemFinished`'s timing (and the wall time of the run)."""
        if isinstance(event, RunFinished):
            self.wall = event.wall
        if not isinstance(event, ItemFinished):
            return
        task = _task_of(event.record)
        if task is None:
            self.untimed += 1
            return
        self.count += 1
        self._grid.add(task.worker, task.start, task.end, task.ok)
        if self._tasks is not None:
            self._tasks.append(task)
            if len(self._tasks) > self.max_bars:
                self._tasks = None

    def svg(self) -> str:
        """The picture of what has been observed so far."""
        if self._tasks is not None:
            return timeline_svg(
                self._tasks,
                title=self.title,
                max_bars=self.max_bars,
                colors={"skipped": SKIPPED_COLOR},
            )
        picture = self._grid.picture(self.title, self.max_bars, self.count)
        picture.subtitle = f"{self.count:,} tasks on {len(self._grid.lanes)} workers"
        if self.wall is not None:
            picture.subtitle += f" in {self.wall:.3f} s"
        return _render(picture)

    def write(self, path: str | Path) -> None:
        """Write the SVG picture to ``path``."""
        Path(path).write_text(self.svg(), encoding="utf-8")


def _task_of(record: Record) -> TaskRecord | None:
    if record.started is None or record.finished is None:
        return None
    if record.status is Status.OK:
        label = "ok"
    elif record.status is Status.SKIPPED:
        label = "skipped"
    else:
        label = str(record.error_code or "failed")
    return TaskRecord(
        index=record.position,
        start=record.started,
        end=record.finished,
        worker=record.worker or "?",
        thread="",
        ok=record.status is not Status.FAILED,
        label=label,
    )
