"""Keeping credentials out of messages, logs and manifests (RELIABILITY.md property 6).

Bottom layer: every stage that shows a URL to a person imports it from here. Works on plain
strings and never raises, because it must also redact URLs that failed validation.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "redact_text", "redact_url", "redact_urls"]

MASK = "***"

# scheme://userinfo@ in any text; greedy up to the LAST "@" before the path, so a password
# containing "@" is masked whole.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")
# A URL given without a scheme ("user:pw@host/x") still has its userinfo at the start.
_BARE_USERINFO = re.compile(r"^(?P<scheme>)(?P<userinfo>[^/?#\s]*)@")


def _mask(match: re.Match[str]) -> str:
    user, sep, _password = match.group("userinfo").partition(":")
    # With a password, the user name is kept (useful, rarely secret); a lone user name is
    # often a token, so it is masked itself.
    shown = f"{user}:{MASK}" if sep and user else MASK
    return f"{match.group('scheme')}{shown}@"


def redact_url(url: str) -> str:
    """``url`` with its password (or lone user name) replaced by ``***``.

    ``http://user:secret@host/p`` → ``http://user:***@host/p``;
    ``https://token@host/`` → ``https://***@host/``. URLs without userinfo come back unchanged.
    """
    if "@" not in url:
        return url
    pattern = _USERINFO if "://" in url else _BARE_USERINFO
    return pattern.sub(_mask, url, count=1)


def redact_urls(urls: list[str]) -> list[str]:
    """Redact each URL of a list (redirect chains)."""
    return [redact_url(u) for u in urls]


def redact_text(text: str) -> str:
    """Every URL credential in free text (an error message) replaced by ``***``."""
    return _USERINFO.sub(_mask, text) if "@" in text else text
