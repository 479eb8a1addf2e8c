"""The address guard: which destinations may be connected to (RELIABILITY.md property 2).

The guard resolves a host once and checks **every** address it gets; the fetcher then
connects to an address the guard returned and to nothing else (see ``transport.py``), so a
DNS answer that changes between the check and the connection (rebinding) cannot redirect us.

By default only globally routable unicast addresses pass. ``ipaddress.is_global`` alone is
not enough: IPv4 addresses can hide inside IPv6 ones (mapped, 6to4, NAT64) and the OS accepts
legacy IPv4 spellings (``2130706433``, ``0x7f.1``, ``0177.0.0.1``), so both are unwrapped first.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from fetchpool.errors import BlockedAddressError, FetchError
from fetchpool.models import ErrorCode

__all__ = ["Address", "AddressGuard", "Resolver", "system_resolver"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``resolver(host, port) -> ["192.0.2.1", "2001:db8::1"]``: strings as getaddrinfo gives them.
Resolver = Callable[[str, int], list[str]]

# Hosts made only of these characters may be legacy numeric IPv4 that inet_aton accepts.
_LEGACY_IPV4 = re.compile(r"[0-9a-fA-FxX.]+")

# Named ranges that are never public destinations, with the label used in error messages.
# Many are already non-global for ipaddress, but listing them keeps the policy explicit and
# independent of the Python version's special-purpose registry.
_DENIED: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignment"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/96", "unspecified, loopback or IPv4-compatible"),
    ("64:ff9b:1::/48", "local NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/23", "IETF protocol assignment"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)
_DENIED_NETS: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(net), label) for net, label in _DENIED
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the operating system (``getaddrinfo``), TCP only."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@functools.lru_cache(maxsize=4096)
def parse_literal(host: str) -> Address | None:
    """The address a literal host denotes, in any spelling the OS accepts; None for a name.

    Cached: it runs for every request, and addresses are immutable values.
    """
    text = host.strip("[]").rstrip(".")
    text = text.split("%", 1)[0]  # an IPv6 zone id does not change which address it is
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text and _LEGACY_IPV4.fullmatch(text):
        try:
            # inet_aton is what connect() paths historically used, so it defines which
            # spellings are "the same address" (decimal, hex, octal, short forms).
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries to an IPv4 host (mapped, 6to4, NAT64)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def denial(address: Address) -> str | None:
    """Why ``address`` is not a public destination (a label), or None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None and (reason := denial(inner)) is not None:
            return f"{reason} (embedded in {address})"
        if address.ipv4_mapped is not None:
            return None  # judged entirely by the IPv4 address it maps to
    for network, label in _DENIED_NETS:
        if address.version == network.version and address in network:
            return label
    if address.is_multicast:
        return "multicast"
    if not address.is_global:
        return "non-global (reserved)"
    return None


class AddressGuard:
    """Resolves hosts and refuses destinations that are not allowed.

    ``allow_private_networks`` allows every address; ``allow_cidrs`` allows the listed
    networks; ``resolver`` replaces DNS (tests inject one, so no real lookups are made).

    Lookups are cached for ``cache_ttl`` seconds (curl's default, 60 s), at most
    ``CACHE_ENTRIES`` names: a list of a million URLs on a few hosts must not send a million
    DNS queries. The cache holds what DNS said, and every address is checked again on every
    use, so it cannot let through anything the guard would refuse; connections still go only
    to the address that was checked.
    """

    CACHE_ENTRIES = 4096

    def __init__(
        self,
        allow_private_networks: bool = False,
        allow_cidrs: tuple[str, ...] = (),
        resolver: Resolver | None = None,
        *,
        cache_ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allow_private_networks = allow_private_networks
        self.allowed: tuple[Network, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in allow_cidrs
        )
        self._resolver: Resolver = resolver or system_resolver
        self._ttl = cache_ttl
        self._clock = clock
        self._cache: OrderedDict[tuple[str, int], tuple[float, list[Address]]] = OrderedDict()
        self._cache_lock = threading.Lock()

    def resolve(self, host: str, port: int) -> list[Address]:
        """Every address of ``host``, all checked; raise if any one of them is refused.

        Raises :class:`BlockedAddressError` for a refused address and :class:`FetchError`
        (``CONNECT_ERROR``) when the name does not resolve.
        """
        literal = parse_literal(host)
        addresses = [literal] if literal is not None else self._lookup(host, port)
        for address in addresses:
            self.check(host, address)
        return addresses

    def resolve_cached(self, host: str, port: int) -> list[Address] | None:
        """:meth:`resolve` when it needs no DNS query (an address literal, or a name in the
        cache): a non-blocking driver calls it on its loop, and :meth:`resolve` on a resolver
        thread only when this gives None. Raises as :meth:`resolve` does."""
        literal = parse_literal(host)
        if literal is not None:
            addresses = [literal]
        else:
            with self._cache_lock:
                hit = self._cache.get((host.lower(), port))
                if hit is None or hit[0] <= self._clock():
                    return None
                addresses = hit[1]
        for address in addresses:
            self.check(host, address)
        return addresses

    def lookup(self, host: str, port: int) -> list[Address]:
        """Every address of ``host``, **unchecked**: only for the proxy the user named
        (``--proxy`` or the environment), which may well live on a private network."""
        literal = parse_literal(host)
        return [literal] if literal is not None else self._lookup(host, port)

    def check(self, host: str, address: Address) -> None:
        """Raise :class:`BlockedAddressError` unless ``address`` is an allowed destination."""
        if self.allow_private_networks or self._explicitly_allowed(address):
            return
        reason = denial(address)
        if reason is None:
            return
        shown = host if host.strip("[]") == str(address) else f"{host} ({address})"
        raise BlockedAddressError(
            ErrorCode.BLOCKED_ADDRESS,
            f"{shown} is a {reason} address, blocked by default; pass "
            f"--allow-private-networks or --allow-cidr {_suggested_cidr(address)} to allow it",
        )

    def _explicitly_allowed(self, address: Address) -> bool:
        candidates: list[Address] = [address]
        if isinstance(address, ipaddress.IPv6Address) and (inner := embedded_ipv4(address)):
            candidates.append(inner)
        return any(_contains(self.allowed, candidate) for candidate in candidates)

    def _lookup(self, host: str, port: int) -> list[Address]:
        key = (host.lower(), port)
        now = self._clock()
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                self._cache.move_to_end(key)
                return hit[1]
        addresses = self._resolve_now(host, port)
        if self._ttl > 0:
            with self._cache_lock:
                self._cache[key] = (now + self._ttl, addresses)
                self._cache.move_to_end(key)
                while len(self._cache) > self.CACHE_ENTRIES:
                    self._cache.popitem(last=False)
        return addresses

    def _resolve_now(self, host: str, port: int) -> list[Address]:
        try:
            raw = self._resolver(host.strip("[]"), port)
        except (OSError, UnicodeError) as exc:
            raise FetchError(ErrorCode.CONNECT_ERROR, f"cannot resolve {host}: {exc}") from exc
        addresses = _unique(_parse_resolved(raw))
        if not addresses:
            raise FetchError(ErrorCode.CONNECT_ERROR, f"cannot resolve {host}: no address")
        return addresses


def _contains(networks: Iterable[Network], address: Address) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def _parse_resolved(raw: Iterable[str]) -> list[Address]:
    result: list[Address] = []
    for text in raw:
        try:
            result.append(ipaddress.ip_address(text.split("%", 1)[0]))
        except ValueError as exc:
            raise FetchError(
                ErrorCode.CONNECT_ERROR, f"resolver returned an invalid address {text!r}"
            ) from exc
    return result


def _unique(addresses: list[Address]) -> list[Address]:
    return list(dict.fromkeys(addresses))


def _suggested_cidr(address: Address) -> str:
    return f"{address}/{address.max_prefixlen}"
