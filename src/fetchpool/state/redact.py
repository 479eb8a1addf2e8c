"""Credential redaction for URLs shown to people (logs, messages, manifests, sidecars).

It lives in ``state`` (the lowest layer that needs it) so that inputs, fetch, outputs and
state can all import it without an upward import. It works on plain strings and never
raises, because it must also redact URLs that failed validation.
"""

from __future__ import annotations

_AUTHORITY_END = "/?#"
MASK = "***"


def redact_url(url: str) -> str:
    """Return ``url`` with the password (or a bare user token) of its userinfo masked.

    ``http://user:secret@host/p`` → ``http://user:***@host/p``;
    ``https://token@host/`` → ``https://***@host/`` (a lone user name is often a token).
    URLs without userinfo come back unchanged.
    """
    scheme_end = url.find("://")
    start = scheme_end + 3 if scheme_end >= 0 else 0
    end = len(url)
    for char in _AUTHORITY_END:
        found = url.find(char, start)
        if found != -1:
            end = min(end, found)
    at = url.rfind("@", start, end)
    if at == -1:
        return url
    userinfo = url[start:at]
    user, sep, _password = userinfo.partition(":")
    masked = f"{user}:{MASK}" if sep and user else MASK
    return f"{url[:start]}{masked}{url[at:]}"


def redact_urls(urls: list[str]) -> list[str]:
    """Redact each URL of a list (redirect chains)."""
    return [redact_url(u) for u in urls]
