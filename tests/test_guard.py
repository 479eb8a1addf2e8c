"""The address guard: literal and resolved destinations, alternate spellings, allow lists.

No real DNS and no traffic: every name goes through an injected resolver.
"""

from __future__ import annotations

import ipaddress

import pytest

from fetchpool.errors import BlockedAddressError, FetchError
from fetchpool.fetch.guard import AddressGuard, parse_literal
from fetchpool.models import ErrorCode


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"unexpected DNS lookup of {host}")


def table(mapping: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    calls: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        if host not in mapping:
            raise OSError(-2, "Name or service not known")
        return mapping[host]

    resolver.calls = calls  # type: ignore[attr-defined]
    return resolver


BLOCKED_LITERALS = [
    "127.0.0.1",
    "127.255.255.254",
    "[::1]",
    "0.0.0.0",
    "[::]",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",
    "[fd00:ec2::254]",
    "100.64.0.1",
    "100.127.255.255",
    "224.0.0.1",
    "239.255.255.250",
    "[ff02::1]",
    "[ff0e::1]",
    "255.255.255.255",
    "240.0.0.1",
    "192.0.2.10",
    "198.51.100.1",
    "203.0.113.5",
    "198.18.0.1",
    "[2001:db8::1]",
    "[fe80::1]",
    "[fc00::1]",
    # alternate spellings of internal addresses
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "127.1",
    "0x7f.1",
    "0",
    "017700000001",
    "0xA9FEA9FE",  # 169.254.169.254
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::ffff:169.254.169.254]",
    "[::127.0.0.1]",  # IPv4-compatible (deprecated)
    "[2002:7f00:1::]",  # 6to4 wrapping 127.0.0.1
    "[2002:a9fe:a9fe::1]",  # 6to4 wrapping the metadata address
    "[64:ff9b::7f00:1]",  # NAT64 wrapping 127.0.0.1
    "[64:ff9b::a00:1]",  # NAT64 wrapping 10.0.0.1
    "[64:ff9b:1::1]",  # local-use NAT64
    "127.0.0.1.",  # trailing dot
]


@pytest.mark.parametrize("host", BLOCKED_LITERALS)
def test_internal_literals_blocked_without_dns(host: str) -> None:
    guard = AddressGuard(resolver=no_dns)
    with pytest.raises(BlockedAddressError) as info:
        guard.resolve(host, 80)
    error = info.value
    assert error.code is ErrorCode.BLOCKED_ADDRESS
    assert "--allow-private-networks" in error.message
    assert "--allow-cidr" in error.message
    assert host.strip("[]").rstrip(".") in error.message


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("[::1]", "::1"),
        ("8.8.8.8", "8.8.8.8"),
        ("example.com", None),
        ("cafe.bad", None),  # hex letters, but a name
        ("beef", None),
        ("1.2.3.4.5", None),
    ],
)
def test_parse_literal(host: str, expected: str | None) -> None:
    parsed = parse_literal(host)
    assert (str(parsed) if parsed else None) == expected


@pytest.mark.parametrize(
    "host",
    ["93.184.216.34", "8.8.8.8", "1.1.1.1", "[2606:4700:4700::1111]", "[::ffff:8.8.8.8]"],
)
def test_public_literals_allowed(host: str) -> None:
    addresses = AddressGuard(resolver=no_dns).resolve(host, 443)
    assert len(addresses) == 1


def test_names_resolving_internal_blocked() -> None:
    resolver = table({"internal.test": ["10.0.0.7"], "meta.test": ["169.254.169.254"]})
    guard = AddressGuard(resolver=resolver)
    for name in ("internal.test", "meta.test"):
        with pytest.raises(BlockedAddressError) as info:
            guard.resolve(name, 80)
        assert name in info.value.message


def test_every_address_must_pass() -> None:
    # One public answer does not launder an internal one (the OS may pick either).
    resolver = table({"mixed.test": ["93.184.216.34", "127.0.0.1"]})
    with pytest.raises(BlockedAddressError) as info:
        AddressGuard(resolver=resolver).resolve("mixed.test", 80)
    assert "127.0.0.1" in info.value.message


def test_public_name_allowed_and_deduplicated() -> None:
    resolver = table({"ok.test": ["93.184.216.34", "93.184.216.34", "2606:2800:220:1::1"]})
    addresses = AddressGuard(resolver=resolver).resolve("ok.test", 80)
    assert addresses == [
        ipaddress.ip_address("93.184.216.34"),
        ipaddress.ip_address("2606:2800:220:1::1"),
    ]


def test_resolver_with_scope_id() -> None:
    resolver = table({"ll.test": ["fe80::1%eth0"]})
    with pytest.raises(BlockedAddressError):
        AddressGuard(resolver=resolver).resolve("ll.test", 80)


def test_unresolvable_is_connect_error() -> None:
    with pytest.raises(FetchError) as info:
        AddressGuard(resolver=table({})).resolve("nowhere.test", 80)
    assert info.value.code is ErrorCode.CONNECT_ERROR
    assert not isinstance(info.value, BlockedAddressError)


def test_empty_answer_is_connect_error() -> None:
    with pytest.raises(FetchError) as info:
        AddressGuard(resolver=table({"empty.test": []})).resolve("empty.test", 80)
    assert info.value.code is ErrorCode.CONNECT_ERROR


def test_invalid_resolver_answer_is_connect_error() -> None:
    with pytest.raises(FetchError) as info:
        AddressGuard(resolver=table({"bad.test": ["not-an-ip"]})).resolve("bad.test", 80)
    assert info.value.code is ErrorCode.CONNECT_ERROR


def test_allow_private_networks_allows_everything() -> None:
    guard = AddressGuard(allow_private_networks=True, resolver=no_dns)
    for host in ("127.0.0.1", "[::1]", "169.254.169.254", "2130706433", "[fd00:ec2::254]"):
        assert guard.resolve(host, 80)


def test_allow_cidrs_allows_only_listed() -> None:
    guard = AddressGuard(allow_cidrs=("127.0.0.0/8", "fd00::/8"), resolver=no_dns)
    assert guard.resolve("127.0.0.5", 80)
    assert guard.resolve("[fd00:ec2::254]", 80)
    assert guard.resolve("[::ffff:127.0.0.1]", 80)  # same host, IPv6-mapped
    for host in ("10.0.0.1", "169.254.169.254", "[::1]"):
        with pytest.raises(BlockedAddressError):
            guard.resolve(host, 80)


def test_blocked_error_pickles() -> None:
    import pickle

    with pytest.raises(BlockedAddressError) as info:
        AddressGuard(resolver=no_dns).resolve("127.0.0.1", 80)
    clone = pickle.loads(pickle.dumps(info.value))
    assert isinstance(clone, BlockedAddressError)
    assert clone.message == info.value.message


def test_lookups_are_cached_for_the_ttl_and_still_checked() -> None:
    calls: list[str] = []
    now = [0.0]

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"] if host == "loop.test" else ["93.184.216.34"]

    guard = AddressGuard(resolver=resolver, cache_ttl=60.0, clock=lambda: now[0])
    for _ in range(3):
        assert [str(a) for a in guard.resolve("Public.test", 443)] == ["93.184.216.34"]
    assert calls == ["Public.test"]  # one lookup, names compared case-insensitively
    now[0] = 61.0
    guard.resolve("public.test", 443)
    assert calls == ["Public.test", "public.test"]  # expired: asked again
    for _ in range(2):  # a cached internal answer is refused every time, never waved through
        with pytest.raises(BlockedAddressError):
            guard.resolve("loop.test", 80)
    assert calls.count("loop.test") == 1


def test_the_dns_cache_is_bounded() -> None:
    guard = AddressGuard(resolver=lambda host, port: ["93.184.216.34"])
    for i in range(AddressGuard.CACHE_ENTRIES + 100):
        guard.resolve(f"h{i}.test", 80)
    assert len(guard._cache) == AddressGuard.CACHE_ENTRIES
