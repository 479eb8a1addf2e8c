"""Observation as a plug-in: the engine emits events, observers subscribe. Bottom layer.

Progress bars, summaries, logs and timelines are observers; none of them is called directly
by the engine. An observer must be quick and must not raise: the engine calls it from the
thread that owns the run loop (never from fetch threads), so observers need no locking.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from fetchpool.models import Record


@dataclass(frozen=True, slots=True)
class RunStarted:
    total: int | None  # None when the input length is not known up front
    out: str


@dataclass(frozen=True, slots=True)
class ItemFinished:
    record: Record


@dataclass(frozen=True, slots=True)
class RunFinished:
    wall: float
    interrupted: bool


Event = RunStarted | ItemFinished | RunFinished


class Observer(Protocol):
    def on_event(self, event: Event) -> None: ...


class Broadcast:
    """Fan one event out to many observers."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self._observers = list(observers)

    def add(self, observer: Observer) -> None:
        self._observers.append(observer)

    def on_event(self, event: Event) -> None:
        for observer in self._observers:
            observer.on_event(event)
