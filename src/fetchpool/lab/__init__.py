"""The lab: every claim of the "Threading in Python" notebook, re-measured on this machine.

Run it with ``fetchpool lab --list`` / ``fetchpool lab NAME...`` / ``fetchpool lab --all``;
see ``docs/lab.md``. The scenarios live in :mod:`fetchpool.lab.scenarios`, the tables and the
HTML report in :mod:`fetchpool.lab.report`, the command in :mod:`fetchpool.lab.cli`.
"""

from __future__ import annotations

from fetchpool.lab.scenarios import (
    SCENARIOS,
    Figure,
    Result,
    Scenario,
    Verdict,
    cpu_verdict,
    resolve,
    run_scenarios,
)

__all__ = [
    "SCENARIOS",
    "Figure",
    "Result",
    "Scenario",
    "Verdict",
    "cpu_verdict",
    "resolve",
    "run_scenarios",
]
