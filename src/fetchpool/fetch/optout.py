"""Opt-out directives in a response head: ``X-Robots-Tag`` and the TDM Reservation Protocol.

A site can say that its files must not be used to train AI models (or indexed, or mined):

* ``X-Robots-Tag: noai`` (also ``noimageai``, ``noml``, ``noindex``, ``noimageindex``, ...),
  for every crawler, or scoped to one: ``X-Robots-Tag: fetchpool: noai``. A header may hold a
  comma-separated list, and a response may carry several ``X-Robots-Tag`` fields; a user-agent
  scope (``otherbot: noindex, noai``) applies to the rest of its field, as search engines read
  it. A scope applies to us when it names one of our tokens (``fetchpool``, the
  ``--user-agent-token``, the product name of a custom ``--user-agent``), compared without
  regard to case, as img2dataset compares its ``user_agent_token``.
* ``tdm-reservation: 1``: the W3C TDM Reservation Protocol (TDMRep) says text-and-data-mining
  rights are reserved; it is honoured when ``tdm-reservation`` is in the list.

:func:`opt_out` decides from the head alone, before any byte of the body is read; the fetcher
then drops the body and fails the item ``opted_out`` (not retried). Which directives are
honoured is ``FetchConfig.disallowed_header_directives`` (``--disallowed-header-directives``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

__all__ = ["TDM_RESERVATION", "agent_tokens", "opt_out"]

#: The directive name that stands for the ``tdm-reservation: 1`` header.
TDM_RESERVATION = "tdm-reservation"
#: X-Robots-Tag rules that carry a value after a colon (``max-snippet: 20``): not user agents.
_VALUED = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
#: ``none`` is shorthand for ``noindex, nofollow`` (Google's documentation).
_IMPLIED = {"none": ("noindex", "nofollow")}
_AGENT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.*")


def agent_tokens(user_agent: str, token: str | None) -> frozenset[str]:
    """The user-agent names an X-Robots-Tag scope may use for us, lowercased: ``fetchpool``,
    the ``--user-agent-token`` and the product name the User-Agent starts with."""
    names = {"fetchpool"}
    if token:
        names.add(token.strip().lower())
    product = user_agent.split("/", 1)[0].split(None, 1)
    if product:
        names.add(product[0].lower())
    return frozenset(names)


def opt_out(
    get_all: Callable[[str], Iterable[str]],
    disallowed: frozenset[str],
    agents: frozenset[str],
) -> str | None:
    """Why the response must not be saved (the directive and the header that says it), or
    None. ``get_all(name)`` gives every value of a header field (one per field line)."""
    if not disallowed:
        return None
    for value in get_all("x-robots-tag"):
        found = _robots_directive(value, disallowed, agents)
        if found is not None:
            return found
    if TDM_RESERVATION in disallowed:
        for value in get_all("tdm-reservation"):
            if any(part.strip() == "1" for part in value.split(",")):
                return f"tdm-reservation (header tdm-reservation: {_shown(value)})"
    return None


def _robots_directive(value: str, disallowed: frozenset[str], agents: frozenset[str]) -> str | None:
    scope: str | None = None  # None: every crawler; else the user agent named last
    for element in value.split(","):
        text = element.strip()
        head, colon, rest = text.partition(":")
        name = head.strip().lower()
        if colon and name not in _VALUED and name and _AGENT_CHARS.issuperset(name):
            scope, text = name, rest.strip()
        rule = text.partition(":")[0].strip().lower()
        if scope is not None and scope != "*" and scope not in agents:
            continue
        for directive in (rule, *_IMPLIED.get(rule, ())):
            if directive in disallowed:
                implied = f" (= {', '.join(_IMPLIED[rule])})" if directive != rule else ""
                return f"{rule}{implied} (header X-Robots-Tag: {_shown(value)})"
    return None


def _shown(value: str) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in value.strip())
    return text if len(text) <= 200 else text[:200] + "..."
