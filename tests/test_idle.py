"""The idle keep-alive bookkeeping both drivers share (fetch/idle.py): pure, no sockets."""

from __future__ import annotations

from fetchpool.fetch.idle import IdleConnections


def test_a_key_keeps_at_most_its_cap_and_hands_back_the_newest() -> None:
    idle: IdleConnections[str] = IdleConnections(budget=10)
    assert idle.put("a", "a1", cap=2) == []
    assert idle.put("a", "a2", cap=2) == []
    assert idle.put("a", "a3", cap=2) == ["a3"]  # the key is full: close the newcomer
    assert len(idle) == 2
    assert idle.take("a") == "a2"
    assert idle.take("a") == "a1"
    assert idle.take("a") is None
    assert len(idle) == 0


def test_over_the_budget_the_least_recently_used_keys_oldest_goes_first() -> None:
    idle: IdleConnections[str] = IdleConnections(budget=3)
    for conn in ("a1", "a2"):
        idle.put("a", conn, cap=4)
    idle.put("b", "b1", cap=4)
    assert idle.put("c", "c1", cap=4) == ["a1"]
    # a is the most recently used key now: b (used longest ago) loses its connection
    assert idle.put("a", "a3", cap=4) == ["b1"]
    assert idle.put("d", "d1", cap=4) == ["c1"]
    assert len(idle) == 3
    assert sorted(idle.clear()) == ["a2", "a3", "d1"]


def test_removing_and_popping_keep_the_count_and_forget_empty_keys() -> None:
    idle: IdleConnections[str] = IdleConnections(budget=8)
    for key, conn in (("a", "a1"), ("a", "a2"), ("b", "b1")):
        idle.put(key, conn, cap=4)
    assert idle.remove("a", "a1") and not idle.remove("a", "a1")
    assert idle.pop_key("a") == ["a2"] and idle.pop_key("a") == []
    assert len(idle) == 1
    assert idle.remove("b", "b1") and len(idle) == 0
    assert idle.take("b") is None and idle.clear() == []


def test_a_full_key_with_nothing_idle_leaves_nothing_behind() -> None:
    idle: IdleConnections[str] = IdleConnections(budget=4)
    assert idle.put("proxy", "p1", cap=0) == ["p1"]
    assert len(idle) == 0 and idle.clear() == []
