"""HostScheduler: per-host caps, rate, Retry-After slow-down and round-robin fairness."""

from __future__ import annotations

from fetchpool.engine.scheduler import HostScheduler, host_key


def test_host_key_lowercases_and_ignores_port_and_credentials() -> None:
    assert host_key("http://User:pw@Example.COM:8080/a") == "example.com"
    assert host_key("not a url") == ""


def test_per_host_cap_is_held_and_released() -> None:
    s: HostScheduler[int] = HostScheduler(per_host=2)
    for i in range(5):
        s.add("a", i)
    assert [item for _, item in s.take(0.0, budget=10)] == [0, 1]
    assert list(s.take(0.0, budget=10)) == []
    s.release("a", 0.0)
    assert [item for _, item in s.take(0.0, budget=10)] == [2]
    assert s.waiting == 2


def test_round_robin_keeps_a_busy_host_from_starving_others() -> None:
    s: HostScheduler[str] = HostScheduler(per_host=100)
    for i in range(10):
        s.add("slow", f"slow{i}")
    s.add("fast", "fast0")
    taken = [item for _, item in s.take(0.0, budget=2)]
    assert taken == ["slow0", "fast0"]


def test_rate_per_host_spaces_requests() -> None:
    s: HostScheduler[int] = HostScheduler(per_host=10, rate_per_host=2.0)
    s.add("a", 1)
    s.add("a", 2)
    assert [i for _, i in s.take(0.0, budget=10)] == [1]
    assert list(s.take(0.2, budget=10)) == []
    wake = s.next_wakeup(0.2)
    assert wake is not None and abs(wake - 0.3) < 1e-9
    assert [i for _, i in s.take(0.5, budget=10)] == [2]


def test_slow_down_blocks_only_that_host() -> None:
    s: HostScheduler[str] = HostScheduler(per_host=10)
    s.slow_down("limited", until=100.0)
    s.add("limited", "x")
    s.add("other", "y")
    assert [i for _, i in s.take(1.0, budget=10)] == ["y"]
    assert [i for _, i in s.take(100.0, budget=10)] == ["x"]


def test_delayed_retry_goes_ahead_of_new_work_when_due() -> None:
    s: HostScheduler[str] = HostScheduler(per_host=1)
    s.add("a", "new")
    s.add_later("a", "retry", at=5.0)
    assert s.waiting == 2
    assert s.next_wakeup(0.0) == 5.0
    assert [i for _, i in s.take(6.0, budget=1)] == ["retry"]


def test_drain_returns_everything_once() -> None:
    s: HostScheduler[int] = HostScheduler(per_host=1)
    s.add("a", 1)
    s.add("b", 2)
    s.add_later("a", 3, at=10.0)
    assert sorted(s.drain()) == [1, 2, 3]
    assert s.waiting == 0
    assert list(s.take(100.0, budget=10)) == []


def test_idle_hosts_are_forgotten() -> None:
    s: HostScheduler[int] = HostScheduler(per_host=1)
    for i in range(1000):
        s.add(f"h{i}", i)
    taken = list(s.take(0.0, budget=1000))
    for host, _ in taken:
        s.release(host, 0.0)
    assert s._hosts == {}
