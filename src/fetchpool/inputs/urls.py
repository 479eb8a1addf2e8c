"""URL validation for input items: cheap, strict, and safe to show in messages.

A URL that fails here never reaches the network: it becomes a :class:`~fetchpool.models.BadInput`.
The checks are deliberately stricter than browsers (no whitespace, no backslash in the
authority) because lenient parsers disagree on such URLs, and a disagreement between our
validator and urllib3 is how requests end up at a host nobody asked for.
"""

from __future__ import annotations

import ipaddress
import re

from fetchpool.errors import ItemError
from fetchpool.models import ErrorCode
from fetchpool.plainurl import split_plain
from fetchpool.redact import redact_url

MAX_URL_LENGTH = 8192
ALLOWED_SCHEMES = frozenset({"http", "https"})

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
# Characters that are never part of a host name. '%' is excluded too: percent-encoded
# hosts are legal in theory but only ever seen in attacks and parser-confusion tests.
_BAD_HOST_CHARS = frozenset('<>"{}|\\^`%@[] ')
_PREVIEW = 80


class InvalidURLError(ItemError):
    """An input URL was rejected; ``code`` is INVALID_URL or UNSUPPORTED_SCHEME."""


def _fail(code: ErrorCode, message: str) -> InvalidURLError:
    return InvalidURLError(code, message)


def preview(url: str) -> str:
    """A redacted, length-capped rendering of ``url`` for messages."""
    shown = redact_url(url)
    if len(shown) > _PREVIEW:
        shown = shown[:_PREVIEW] + f"... ({len(url)} chars)"
    return repr(shown)


# One C-speed scan finds any control character or whitespace (\s covers Unicode spaces
# such as U+2028); the slow path below only runs to word the message.
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f-\x9f\s]")


def _check_characters(url: str) -> None:
    found = _FORBIDDEN.search(url)
    if found is None:
        return
    char = found.group()
    if char in "\r\n":
        problem = "a line break"
    elif char.isspace():
        problem = "whitespace"
    else:
        problem = "a control character"
    raise _fail(ErrorCode.INVALID_URL, f"URL contains {problem}: {preview(url)}")


def _check_scheme(url: str) -> str:
    """Return the rest of the URL after ``scheme:``."""
    match = _SCHEME.match(url)
    # "example.com:8080/x" parses as scheme "example.com"; a digit after the colon means it
    # was a port, i.e. the user forgot the scheme.
    if match is None or url[match.end() : match.end() + 1].isdigit():
        raise _fail(
            ErrorCode.INVALID_URL, f"URL has no scheme (http:// or https://): {preview(url)}"
        )
    scheme = match.group(1).lower()
    if scheme not in ALLOWED_SCHEMES:
        raise _fail(
            ErrorCode.UNSUPPORTED_SCHEME,
            f"scheme {scheme!r} is not supported (only http and https): {preview(url)}",
        )
    return url[match.end() :]


def _split_authority(url: str, rest: str) -> str:
    if not rest.startswith("//"):
        raise _fail(ErrorCode.INVALID_URL, f"URL has no host: {preview(url)}")
    rest = rest[2:]
    end = len(rest)
    for char in "/?#":
        found = rest.find(char)
        if found != -1:
            end = min(end, found)
    authority = rest[:end]
    if "\\" in authority:
        raise _fail(ErrorCode.INVALID_URL, f"backslash in the URL's host part: {preview(url)}")
    return authority


def _check_port(url: str, port: str) -> None:
    if port == "":  # RFC 3986 allows "host:" meaning the default port
        return
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _fail(ErrorCode.INVALID_URL, f"invalid port {port[:10]!r}: {preview(url)}")


def _check_host(url: str, hostport: str) -> None:
    if hostport.startswith("["):
        close = hostport.find("]")
        if close == -1:
            raise _fail(ErrorCode.INVALID_URL, f"unclosed '[' in the host: {preview(url)}")
        literal, after = hostport[1:close], hostport[close + 1 :]
        try:
            ipaddress.IPv6Address(literal.split("%", 1)[0])
        except ValueError:
            raise _fail(ErrorCode.INVALID_URL, f"invalid IPv6 address: {preview(url)}") from None
        if after and not after.startswith(":"):
            raise _fail(ErrorCode.INVALID_URL, f"junk after the IPv6 address: {preview(url)}")
        _check_port(url, after[1:])
        return
    host, _, port = hostport.partition(":")
    if not host:
        raise _fail(ErrorCode.INVALID_URL, f"URL has no host: {preview(url)}")
    if any(char in _BAD_HOST_CHARS for char in host):
        raise _fail(ErrorCode.INVALID_URL, f"invalid character in the host: {preview(url)}")
    _check_port(url, port)


def _punycode_host(url: str, authority: str, hostport: str) -> str:
    """Rewrite a Unicode host name as IDNA ASCII (``bücher.example`` → ``xn--bcher-kva...``).

    urllib3 can only parse Unicode hosts with the optional ``idna`` package; converting here
    makes such URLs fetchable everywhere. The stdlib codec implements IDNA 2003.
    """
    host, colon, port = hostport.partition(":")
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise _fail(
            ErrorCode.INVALID_URL, f"invalid international host name: {preview(url)}"
        ) from None
    userinfo = authority[: len(authority) - len(hostport)]
    start = url.index("//") + 2
    return f"{url[:start]}{userinfo}{ascii_host}{colon}{port}{url[start + len(authority) :]}"


def validate_url(raw: str) -> str:
    """Return ``raw`` stripped of surrounding whitespace if it is a fetchable http(s) URL.

    Raises :class:`InvalidURLError` (``code`` INVALID_URL or UNSUPPORTED_SCHEME) with a
    message that never contains credentials. The URL is otherwise returned as given (it is
    the item's identity), except that a Unicode host name is converted to IDNA ASCII.
    """
    url = raw.strip()
    if not url:
        raise _fail(ErrorCode.INVALID_URL, "empty URL")
    if len(url) > MAX_URL_LENGTH:
        raise _fail(
            ErrorCode.INVALID_URL,
            f"URL is {len(url)} characters long (limit {MAX_URL_LENGTH}): {preview(url)}",
        )
    if split_plain(url) is not None:  # the common shape: valid, and no general parse needed
        return url
    _check_characters(url)
    rest = _check_scheme(url)
    authority = _split_authority(url, rest)
    _userinfo, _, hostport = authority.rpartition("@")
    _check_host(url, hostport)
    if not hostport.isascii():
        url = _punycode_host(url, authority, hostport)
    from urllib3.exceptions import LocationParseError  # only for URLs of unusual shape
    from urllib3.util import parse_url

    try:
        # Our own checks came first for clear messages; urllib3 must agree, because it is
        # the parser the fetcher uses.
        parsed = parse_url(url)
    except (LocationParseError, ValueError):
        raise _fail(ErrorCode.INVALID_URL, f"URL cannot be parsed: {preview(url)}") from None
    if not parsed.host:
        raise _fail(ErrorCode.INVALID_URL, f"URL has no host: {preview(url)}")
    return url
