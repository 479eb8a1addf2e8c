"""The fetch stage: one attempt per URL over HTTP(S), behind the address guard."""

from fetchpool.fetch.client import HttpFetcher
from fetchpool.fetch.content import sniff_extension
from fetchpool.fetch.guard import AddressGuard
from fetchpool.fetch.mock import MockFetcher, MockResponse, MockTransport

__all__ = [
    "AddressGuard",
    "HttpFetcher",
    "MockFetcher",
    "MockResponse",
    "MockTransport",
    "sniff_extension",
]
