"""Input readers: turn a file, stdin or an iterable into a stream of Job / BadInput."""

from __future__ import annotations

from fetchpool.inputs.readers import (
    FORMATS,
    MAX_LINE_BYTES,
    PARQUET_HINT,
    check_input,
    estimate_total,
    read_input,
)
from fetchpool.inputs.urls import MAX_URL_LENGTH, InvalidURLError, validate_url
from fetchpool.redact import redact_url

__all__ = [
    "FORMATS",
    "MAX_LINE_BYTES",
    "MAX_URL_LENGTH",
    "PARQUET_HINT",
    "InvalidURLError",
    "check_input",
    "estimate_total",
    "read_input",
    "redact_url",
    "validate_url",
]
