"""The exception tree. Bottom layer: imports only :mod:`fetchpool.models`.

::

    FetchpoolError
    ├── ConfigError          bad option or usage                         (exit 2)
    ├── InputError           the input file cannot be read at all        (exit 2)
    ├── FetchError           one item's fetch failed (carries an ErrorCode)
    │   └── BlockedAddressError   destination refused by the address guard
    ├── ProcessError         one item's CPU stage failed (carries an ErrorCode)
    ├── OutputError          the output folder is unusable               (exit 2)
    │   └── DiskFullError    no space left: the run stops early
    └── StateError           the journal is unusable                      (exit 2)
        └── LockedError      another run holds this output folder        (exit 2)

Per-item failures (FetchError, ProcessError) never escape a run: they become failed records.
Every exception here pickles, because some cross the process-pool boundary.
"""

from __future__ import annotations

from fetchpool.models import ErrorCode


class FetchpoolError(Exception):
    """Root of every error fetchpool raises on purpose."""


class ConfigError(FetchpoolError, ValueError):
    """An option or combination of options is invalid."""


class InputError(FetchpoolError):
    """The input as a whole cannot be read (missing file, unknown format, missing column)."""


class ItemError(FetchpoolError):
    """A failure of one item, with a stable code. Pickles across processes."""

    def __init__(self, code: ErrorCode, message: str, *, http_status: int | None = None) -> None:
        super().__init__(code, message, http_status)
        self.code = code
        self.message = message
        self.http_status = http_status

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_item_error, (type(self), self.code, self.message, self.http_status))

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def _rebuild_item_error(
    cls: type[ItemError], code: ErrorCode, message: str, http_status: int | None
) -> ItemError:
    return cls(code, message, http_status=http_status)


class FetchError(ItemError):
    """One URL could not be fetched."""


class BlockedAddressError(FetchError):
    """The destination address is not allowed (private, loopback, metadata, ...)."""

    def __init__(
        self,
        code: ErrorCode = ErrorCode.BLOCKED_ADDRESS,
        message: str = "blocked address",
        *,
        http_status: int | None = None,
    ) -> None:
        super().__init__(code, message, http_status=http_status)


class ProcessError(ItemError):
    """One item's CPU-stage work (decode, resize, encode) failed."""


class OutputError(FetchpoolError):
    """The output folder cannot be used; the run stops."""


class DiskFullError(OutputError):
    """No space left on the output device; the run stops early, finished files stay."""


class StateError(FetchpoolError):
    """The state journal cannot be opened or written."""


class LockedError(StateError):
    """Another fetchpool run is using this output folder."""
