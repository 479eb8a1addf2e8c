"""fetchpool: download large lists of URLs fast, resumably, and show what happened."""

from __future__ import annotations

__all__: list[str] = []
