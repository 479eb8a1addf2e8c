"""The fetch engines the suite runs over, read from the registry (``--engine``).

Parametrize an end-to-end test over :data:`ENGINES` (``@pytest.mark.parametrize("engine",
ENGINES)``), passing ``engine=engine`` to ``download()`` or :func:`engine_args` to the CLI:
a backend added to ``fetchpool.engine.backends.BACKENDS`` is then tested by every such test.
"""

from __future__ import annotations

from fetchpool.engine.backends import BACKENDS

ENGINES: tuple[str, ...] = tuple(BACKENDS)


def engine_args(engine: str) -> tuple[str, ...]:
    """The CLI arguments that pick ``engine``."""
    return ("--engine", engine)
