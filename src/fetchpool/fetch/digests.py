"""Digests of downloaded bytes (``--hash``) and the expected ones an input row gives
(``--verify-hash-column``).

The fetcher always computes sha256 while it streams a body (``fetched_sha256``); ``--hash
md5|sha512`` (or a ``--verify-hash-type`` other than sha256) adds that digest, computed in the
same pass, stored in the record's ``md5`` / ``sha512`` column. The bytes hashed are the body
as fetched, decoded from any ``Content-Encoding``: what a later download of the same URL
gives, before the CPU stage resizes or re-encodes anything (``sha256`` describes the output).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

__all__ = ["DIGEST_SIZES", "expected_digest", "new_hash"]

#: Digest size in bytes of each supported algorithm.
DIGEST_SIZES = {"md5": 16, "sha256": 32, "sha512": 64}


def new_hash(name: str) -> Any:
    """A hashlib object for ``name`` (md5 is asked for as a checksum, not for security, so
    it works on FIPS systems too)."""
    return hashlib.new(name, usedforsecurity=False)


def expected_digest(value: Any, name: str) -> bytes:
    """The digest an input cell gives for algorithm ``name``, as raw bytes.

    Accepted: hex (any case; what img2dataset, LAION's md5 collections and DataComp use),
    standard or URL-safe base64 with or without padding (``Content-MD5``, Subresource
    Integrity), either optionally after ``name:`` or ``name-`` (``sha256-…``), and the raw
    digest bytes (a binary Parquet column). Hex and base64 lengths never coincide for a
    given algorithm, so there is no ambiguity. Raises ValueError saying what is wrong.
    """
    size = DIGEST_SIZES[name]
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if len(raw) == size:
            return raw
        value = raw.decode("ascii", "replace")
    if not isinstance(value, str):
        raise ValueError(f"is {type(value).__name__} {value!r:.60}, not a {name} digest")
    text = value.strip()
    if not text:
        raise ValueError("is empty")
    for prefix in (f"{name}:", f"{name}-"):
        if text.lower().startswith(prefix):
            text = text[len(prefix) :]
            break
    if len(text) == 2 * size:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    elif len(text.rstrip("=")) == -(-4 * size // 3):
        padded = text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4)
        try:
            raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == size:
            return raw
    shown = text if len(text) <= 80 else text[:80] + "..."
    raise ValueError(
        f"is {shown!r}, not a {name} digest ({2 * size} hex digits, or base64 of {size} bytes)"
    )
