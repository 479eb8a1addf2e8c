"""The common shape of URL, split with one regex. Bottom layer.

Nearly every URL in a real list is ``http(s)://host[:port]/path?query`` with an ASCII host
and only characters that need no escaping. Such a URL is split here, exactly as urllib3's
``parse_url`` would split it (tests/test_inputs.py checks the agreement with Hypothesis), so
validation and the fetcher only import and run urllib3's general parser for the other URLs:
it costs ~20 ms of start-up and ~30 µs per URL, on the run loop's thread.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import urlsplit

__all__ = ["PlainURL", "host_key", "split_plain"]

# Path and query: RFC 3986 unreserved, sub-delims, ":@/" (and "?" in the query), and "%"
# only as an upper-case escape. parse_url leaves exactly these untouched; anything else it
# would re-encode, so such URLs take the general parser.
_CHARS = r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-F]{2})"
_PLAIN = re.compile(
    rf"(https?)://([A-Za-z0-9][A-Za-z0-9.\-]*)(?::([0-9]{{1,5}}))?"
    rf"(/{_CHARS}*)?(\?(?:{_CHARS}|\?)*)?(?:#[!-~]*)?"
)


class PlainURL(NamedTuple):
    scheme: str
    host: str  # lower-cased, as parse_url normalizes it
    port: int | None  # None: the scheme's default
    request_uri: str  # path (at least "/") and query, without the fragment


def split_plain(url: str) -> PlainURL | None:
    """``url`` split into its parts, or None when it is not of the common shape (then use
    the general parser). A plain URL is always a valid one: the port is 1..65535."""
    match = _PLAIN.fullmatch(url)
    if match is None:
        return None
    scheme, host, port, path, query = match.groups()
    if path is not None and "/." in path:  # dot segments: parse_url removes them
        return None
    number = None
    if port is not None:
        number = int(port)
        if not 1 <= number <= 65535:
            return None
    return PlainURL(scheme, host.lower(), number, (path or "/") + (query or ""))


def host_key(url: str) -> str:
    """The politeness key of a URL: its lower-cased host name (ports share a host's budget).

    The scheduler keeps per-host limits by it, and the fetcher hands an item back to the
    scheduler when a redirect leads to another key (:class:`fetchpool.models.Hop`).
    """
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""
