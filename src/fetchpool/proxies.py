"""Which proxy a URL goes through: ``--proxy`` and the environment, by curl's rules. Bottom layer.

::

    --proxy URL ─────────────┐ (for http and https targets)
    http_proxy               ├─▶ ProxyPolicy.route(scheme, host) ─▶ Proxy | None
    https_proxy, HTTPS_PROXY │       no_proxy / NO_PROXY: hosts that go direct
    all_proxy, ALL_PROXY ────┘

The variables are read as curl reads them (``lib/url.c``, ``lib/noproxy.c``): the lower-case
name first, then the upper-case one, except ``HTTP_PROXY``, which curl never reads: a CGI
program gets a request's ``Proxy:`` header as ``HTTP_PROXY`` ("httpoxy"), so an attacker
could route our requests. A variable set to the empty string means "no proxy" for its
scheme (no fall-back to ``all_proxy``). They are read only when asked, with ``--proxy env``
(RELIABILITY.md: proxies from the environment are off unless asked: a variable set for pip
or a login shell must not silently route a bulk download). ``--proxy URL`` names the proxy;
``no_proxy`` still applies to it, as in curl. Without ``--proxy`` no proxy is used.

The policy holds no socket: the fetcher asks it where each hop goes (fetch/client.py) and
the wire opens the tunnel (fetch/http11.py).
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from fetchpool.errors import ConfigError
from fetchpool.models import ErrorCode
from fetchpool.redact import redact_url

__all__ = [
    "PROXY_VARIABLES",
    "Proxy",
    "ProxyPolicy",
    "bypasses",
    "environment_proxies",
    "parse_proxy",
    "refusal",
]

#: The variables read, in curl's order of preference. ``HTTP_PROXY`` is absent on purpose.
PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
)

#: Names looked up per target scheme; the first one set wins (even when empty).
_LOOKUP = {
    "http": ("http_proxy", "all_proxy", "ALL_PROXY"),
    "https": ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
}


@dataclass(frozen=True, slots=True)
class Proxy:
    """One HTTP proxy: where it listens and the ``Proxy-Authorization`` it is sent.

    ``shown`` is the proxy URL with its password masked (for messages); ``source`` says
    where it came from (``--proxy`` or the variable's name).
    """

    host: str  # as written, IPv6 without brackets
    port: int
    authorization: str | None
    shown: str
    source: str

    def __repr__(self) -> str:  # never the credentials, whatever prints it
        return f"Proxy({self.shown!r}, source={self.source!r})"


def parse_proxy(url: str, source: str) -> Proxy:
    """``http://[user:password@]host[:port][/]`` as a :class:`Proxy`; raise :class:`ConfigError`
    naming ``source`` for anything else. A URL without a scheme is http (as in curl); a
    missing port is 80 (as in wget, Python and requests; curl alone assumes 1080)."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    shown = redact_url(text)
    where = f"{source} {shown}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: not a proxy URL ({exc})") from None
    if parts.scheme.lower() != "http":
        ignore = "" if source == "--proxy" else "; drop --proxy env to ignore the environment's"
        raise ConfigError(
            f"{where}: only http:// proxies are supported (not {parts.scheme}://){ignore}"
        )
    if not parts.hostname:
        raise ConfigError(f"{where}: the proxy URL has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where}: a proxy URL is http://[user:password@]host:port")
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in text):
        raise ConfigError(f"{where}: the proxy URL has spaces or control characters")
    authorization = None
    if parts.username is not None or parts.password is not None:
        token = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(token.encode()).decode("ascii")
    return Proxy(parts.hostname, port or 80, authorization, shown, source)


def environment_proxies(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The proxy variables of ``environ`` that fetchpool reads, as (name, value) pairs."""
    return tuple((name, environ[name]) for name in PROXY_VARIABLES if name in environ)


#: ``--proxy env``: use the proxies the environment names (off unless asked: RELIABILITY.md).
FROM_ENVIRONMENT = "env"


@dataclass(frozen=True, slots=True)
class ProxyPolicy:
    """Where each target goes: a proxy per target scheme and the hosts that go direct."""

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: str = ""

    @classmethod
    def build(cls, proxy: str | None, environment: tuple[tuple[str, str], ...]) -> ProxyPolicy:
        """From ``--proxy`` (``None`` or ``""``: no proxy, the default; ``"env"``: the
        environment's, as curl reads it; else a proxy URL) and the variables captured from the
        environment; raise :class:`ConfigError` for an unusable URL."""
        if proxy is None or proxy == "":
            return cls()
        env = dict(environment)
        no_proxy = env.get("no_proxy", env.get("NO_PROXY", ""))
        if proxy != FROM_ENVIRONMENT:
            given = parse_proxy(proxy, "--proxy")
            return cls(given, given, no_proxy)
        chosen: dict[str, Proxy | None] = {}
        for scheme, names in _LOOKUP.items():
            name = next((n for n in names if n in env), None)
            value = env[name].strip() if name is not None else ""
            chosen[scheme] = parse_proxy(value, name) if name is not None and value else None
        return cls(chosen["http"], chosen["https"], no_proxy)

    @property
    def active(self) -> bool:
        return self.http is not None or self.https is not None

    def route(self, scheme: str, host: str) -> Proxy | None:
        """The proxy for a request to ``scheme://host``, or None to connect directly."""
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or (self.no_proxy and bypasses(host, self.no_proxy)):
            return None
        return proxy


def bypasses(host: str, no_proxy: str) -> bool:
    """True when ``host`` matches ``no_proxy``, as curl ≥ 7.86 matches it.

    ``*`` alone matches every host. Otherwise entries are separated by commas or blanks; a
    name matches itself and its subdomains (``example.com`` and ``.example.com`` both match
    ``www.example.com``, never ``notexample.com``), case-insensitively, trailing dots
    ignored. An IP-literal host matches IP entries and CIDR ranges (``10.0.0.0/8``,
    ``fd00::/8``) only; names are compared as written (no DNS lookup).
    """
    if no_proxy.strip() == "*":
        return True
    name = host.strip("[]").rstrip(".").lower()
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
        address = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        address = None
    for entry in no_proxy.replace(",", " ").split():
        if address is not None:
            if _address_matches(address, entry):
                return True
            continue
        token = entry.rstrip(".").lstrip(".").lower()
        if token and (name == token or name.endswith("." + token)):
            return True
    return False


def _address_matches(address: ipaddress.IPv4Address | ipaddress.IPv6Address, entry: str) -> bool:
    try:
        network = ipaddress.ip_network(entry.strip("[]"), strict=False)
    except ValueError:
        return False
    return address.version == network.version and address in network


#: What a proxy answers when it could not reach the target: transient, like a refused connect.
_GATEWAY_STATUSES = frozenset({502, 503, 504})


def refusal(
    name: str, status: int, reason: str, what: str, sent: tuple[tuple[str, str], ...]
) -> tuple[ErrorCode, str]:
    """The item's error when proxy ``name`` answered ``status`` to ``what`` (``CONNECT
    host:443``, or a plain-HTTP request answered 407). ``sent`` are the fields the proxy
    was sent (did it get credentials?). A gateway status (502/503/504: the proxy could not
    reach the target) is a ``connect_error``, retried; anything else is ``proxy_error``."""
    shown = "".join(ch if ch.isprintable() else " " for ch in reason[:100]).strip()
    answer = f"proxy {name} answered {status}{' ' + shown if shown else ''} to {what}"
    if status in _GATEWAY_STATUSES:
        return ErrorCode.CONNECT_ERROR, f"cannot connect: {answer} (it could not reach the target)"
    if status == 407:
        if any(field.lower() == "proxy-authorization" for field, _ in sent):
            return ErrorCode.PROXY_ERROR, f"{answer}: the proxy refused the credentials given"
        return ErrorCode.PROXY_ERROR, (
            f"{answer}: the proxy wants credentials; give them in the proxy URL "
            "(http://user:password@host:port)"
        )
    return ErrorCode.PROXY_ERROR, answer
