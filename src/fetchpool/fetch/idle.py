"""Idle keep-alive connections by key, under one budget over all keys. No I/O, no locks.

Both drivers keep their idle connections here (the blocking pool in :mod:`fetchpool.fetch.http11`
under its lock, the selector loop in its one thread), so the rules are written once:

* a key (scheme, host, port, checked address) keeps at most its ``cap`` idle connections;
* all keys together keep at most ``budget`` (the descriptor budget's share for idle sockets,
  :func:`fetchpool.fetch.client.fd_budget`): past it, the least recently used key's oldest
  connection goes first, so a run over hundreds of hosts keeps a few for each instead of
  ``per_host`` for the last few it touched;
* a key with no idle connection left is forgotten, so memory stays flat over millions of hosts.

The caller closes what comes back from :meth:`IdleConnections.put` and the other removals.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

C = TypeVar("C")

__all__ = ["IdleConnections"]


class IdleConnections(Generic[C]):
    """Idle connections by key: most recently used key last, newest connection last."""

    __slots__ = ("_budget", "_by_key", "_count")

    def __init__(self, budget: int) -> None:
        self._budget = max(1, budget)
        self._by_key: OrderedDict[Hashable, list[C]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        """Idle connections over all keys."""
        return self._count

    def put(self, key: Hashable, conn: C, cap: int) -> list[C]:
        """Keep ``conn`` for ``key`` (at most ``cap`` for it); return what must be closed:
        ``conn`` itself when its key is full, else the oldest over the budget."""
        idle = self._by_key.setdefault(key, [])
        self._by_key.move_to_end(key)
        if len(idle) >= cap:
            if not idle:
                del self._by_key[key]
            return [conn]
        idle.append(conn)
        self._count += 1
        evicted: list[C] = []
        while self._count > self._budget:
            evicted.append(self._pop_oldest())
        return evicted

    def take(self, key: Hashable) -> C | None:
        """The newest idle connection for ``key`` (removed), or None."""
        idle = self._by_key.get(key)
        if not idle:
            return None
        conn = idle.pop()
        self._count -= 1
        if idle:
            self._by_key.move_to_end(key)
        else:
            del self._by_key[key]
        return conn

    def remove(self, key: Hashable, conn: C) -> bool:
        """Forget ``conn`` (it broke while idle); False when it was not kept."""
        idle = self._by_key.get(key)
        if idle is None or conn not in idle:
            return False
        idle.remove(conn)
        self._count -= 1
        if not idle:
            del self._by_key[key]
        return True

    def pop_key(self, key: Hashable) -> list[C]:
        """Every idle connection of ``key`` (its siblings are likely closed too)."""
        idle = self._by_key.pop(key, [])
        self._count -= len(idle)
        return idle

    def clear(self) -> list[C]:
        """Every idle connection, the structure emptied."""
        every = [conn for idle in self._by_key.values() for conn in idle]
        self._by_key.clear()
        self._count = 0
        return every

    def _pop_oldest(self) -> C:
        key, idle = next(iter(self._by_key.items()))
        conn = idle.pop(0)
        self._count -= 1
        if not idle:
            del self._by_key[key]
        return conn
