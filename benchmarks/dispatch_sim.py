#!/usr/bin/env python3
"""What sets W5's wall time? A discrete-event model of fetchpool's admission and dispatch.

    python benchmarks/dispatch_sim.py [--n 2000 --hosts 300 --concurrency 64 --per-host 16]

Replays W5's URL plan (``harness.web.plan``: Zipf hosts, lognormal latency, stalls) through the
pipeline's own ``HostScheduler`` and admission rule (at most ``Options.in_flight`` =
4·threads + 64 items open; admit in batches once a quarter of the window is free), with each
URL holding a connection for its latency (a hang for the idle timeout, a trickle for the total
timeout), and prints the simulated wall time for several dispatch orders and window sizes, the
floor (``WebSite.floor_s``) and the item that finished last. Network, TLS and CPU cost nothing
here, so a policy that does not move the simulated time cannot move the real one.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from harness import web

from fetchpool.engine.scheduler import HostScheduler

Row = dict[str, Any]


def hold_s(row: Row) -> float:
    """How long one URL holds a connection (the harness's limits for every tool)."""
    if row["kind"] == "hang":
        return float(web.IDLE_TIMEOUT_S)
    if row["kind"] == "trickle":
        return float(web.TOTAL_TIMEOUT_S)
    return float(row["latency_ms"]) / 1000


class LongestQueueFirst(HostScheduler[Row]):
    """Dispatch from the host with the most queued work first (among hosts below their cap)."""

    def take(self, now: float, budget: int) -> Iterator[tuple[str, Row]]:
        self._promote(now)
        while budget > 0:
            ready = [
                h
                for h in self._ready
                if self._hosts[h].active < self._per_host and self._hosts[h].not_before <= now
            ]
            if not ready:
                return
            host = max(ready, key=lambda h: len(self._hosts[h].waiting))
            state = self._hosts[host]
            item = state.waiting.popleft()
            state.active += 1
            self.waiting -= 1
            budget -= 1
            if not state.waiting:
                self._ready.remove(host)
            yield host, item


def simulate(
    rows: list[Row], scheduler: HostScheduler[Row], concurrency: int, window: int
) -> tuple[float, Row, float]:
    """(wall time, the last item to finish, when it started)."""
    now, admitted, open_items, active, done = 0.0, 0, 0, 0, 0
    running: list[tuple[float, int, str, Row, float]] = []
    seq = itertools.count()
    last: tuple[float, Row, float] = (0.0, rows[0], 0.0)
    while done < len(rows):
        free = window - open_items
        if free >= window // 4 or active == 0:  # Pipeline._room
            while admitted < len(rows) and open_items < window:
                row = rows[admitted]
                scheduler.add(str(row["host"]), row)
                admitted += 1
                open_items += 1
        for host, row in scheduler.take(now, concurrency - active):
            active += 1
            heapq.heappush(running, (now + hold_s(row), next(seq), host, row, now))
        now, _, host, row, started = heapq.heappop(running)
        active -= 1
        open_items -= 1
        done += 1
        scheduler.release(host, now)
        last = (now, row, started)
    return last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--hosts", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--per-host", type=int, default=web.PER_HOST)
    parser.add_argument("--seed", type=int, default=web.SEED)
    args = parser.parse_args()
    _, rows = web.plan(args.n, args.hosts, args.seed)
    per_host: dict[int, float] = {}
    for row in rows:
        per_host[int(row["host"])] = per_host.get(int(row["host"]), 0.0) + hold_s(row)
    total = sum(hold_s(r) for r in rows)
    busiest = max(per_host.values()) / args.per_host
    floor = max(total / args.concurrency, busiest, *(hold_s(r) for r in rows))
    window = 4 * args.concurrency + 64
    print(
        f"{args.n} URLs on {args.hosts} hosts, concurrency {args.concurrency}, "
        f"{args.per_host} per host; floor {floor:.2f} s "
        f"(connection-time / C {total / args.concurrency:.2f} s, busiest host "
        f"{busiest:.2f} s)"
    )
    policies: list[tuple[str, type[HostScheduler[Row]]]] = [
        ("round-robin (today)", HostScheduler),
        ("longest queue first", LongestQueueFirst),
    ]
    for name, cls in policies:
        for factor in (1, 4):
            scheduler = cls(args.per_host)
            wall, row, started = simulate(rows, scheduler, args.concurrency, window * factor)
            print(
                f"{name:22s} window {window * factor:5d}: {wall:6.2f} s  last: item "
                f"{rows.index(row)} ({row['kind']}, host {row['host']}) started at {started:.2f} s"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
