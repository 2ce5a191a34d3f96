"""Destination URL macros (spec/links.txt, CONTRACT.md §4): pure functions, no I/O.

A template is parsed once (the redirect caches the parsed form per offer) and filled per click:

* ``{name}`` and ``{{name}}`` are macros; names are matched case-insensitively.
* Known names come from the click (``click_id``, ``ip``...), the offer (``affiliate_id``...) or the
  query string forwarded from the short link (``sub1``...``sub5``, ``source``, ``creative``,
  ``cost``); ``{{sendId}}`` is the message id, empty outside a message.
* Every value is percent-encoded (``&``, ``#``, ``/``, ``?``, ``=`` included) so a value can never
  add a parameter or change the path; unknown macros become empty.
* A template with no macros at all gets ``click_id`` and the given ``sub1``..``sub5`` appended as
  query parameters (before any ``#fragment``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote

MACRO_RE = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}|\{([A-Za-z0-9_]+)\}")

SUBS = ("sub1", "sub2", "sub3", "sub4", "sub5")
# Macros a short link's query string may fill. Click facts (click_id, ip...) are never taken from it.
QUERY_MACROS = frozenset((*SUBS, "source", "creative", "cost"))
CLICK_MACROS = frozenset(
    (
        "click_id", "transaction_id", "affiliate_id", "offer_id", "account_id", "ip", "user_agent",
        "datetime", "country_code", "sendid",
    )
)
KNOWN_MACROS = QUERY_MACROS | CLICK_MACROS


class ClickFacts(NamedTuple):
    """What the edge knows about one click, for ``fill_facts`` (the redirect's hot path)."""

    click_id: str
    affiliate_id: str | None
    offer_id: str
    account_id: str
    ip: str | None
    user_agent: str | None
    datetime: str
    country_code: str | None
    message_id: str | None


# Macro name -> index in ClickFacts.
_FACT_INDEX = {
    "click_id": 0, "transaction_id": 0, "affiliate_id": 1, "offer_id": 2, "account_id": 3, "ip": 4,
    "user_agent": 5, "datetime": 6, "country_code": 7, "sendid": 8,
}


@dataclass(frozen=True, slots=True)
class Template:
    """A destination URL split into literal text and (lower-cased) macro names."""

    raw: str
    literals: tuple[str, ...]  # len(names) + 1 pieces of literal text around the macros
    names: tuple[str, ...]
    # Per macro: an index into ClickFacts, a query parameter name, or None (unknown: empty).
    slots: tuple[int | str | None, ...] = ()
    # (slot, literal after it) per macro, for fill_facts' loop.
    steps: tuple[tuple[int | str | None, str], ...] = ()

    @property
    def has_macros(self) -> bool:
        return bool(self.names)


def parse(template: str) -> Template:
    literals: list[str] = []
    names: list[str] = []
    pos = 0
    for match in MACRO_RE.finditer(template):
        literals.append(template[pos:match.start()])
        names.append((match.group(1) or match.group(2)).lower())
        pos = match.end()
    literals.append(template[pos:])
    slots = tuple(_FACT_INDEX.get(n, n if n in QUERY_MACROS else None) for n in names)
    return Template(template, tuple(literals), tuple(names), slots, tuple(zip(slots, literals[1:])))


_UNRESERVED_RE = re.compile(r"[A-Za-z0-9_.~-]*")
_unreserved = _UNRESERVED_RE.fullmatch
# A value that is a whole dot segment: in a path, "/offers/{sub1}/landing" with sub1=".." would
# take the visitor elsewhere on the advertiser's host, and percent-encoding does not help (browsers
# read %2E as a dot there, as the URL standard says). Filled as empty, wherever the macro is.
_DOT_SEGMENTS = frozenset((".", ".."))


def encode(value: object) -> str:
    text = str(value)
    if text.isalnum() and text.isascii():  # ids, hex, digits: the cheapest check first
        return text
    if text in _DOT_SEGMENTS:
        return ""
    if _UNRESERVED_RE.fullmatch(text):  # most values (ids, plain words): nothing to escape
        return text
    return quote(text, safe="")


def click_values(
    *,
    click_id: str,
    offer_id: str,
    account_id: int | str,
    affiliate_id: str | None,
    query: Mapping[str, str],
    ip: str | None,
    user_agent: str | None,
    datetime: str,
    country_code: str | None,
    message_id: str | None,
) -> dict[str, str]:
    """Every known macro's raw (unencoded) value for one click."""
    values = {name: query.get(name, "") for name in QUERY_MACROS}
    values.update(
        click_id=click_id,
        transaction_id=click_id,
        affiliate_id=affiliate_id or "",
        offer_id=offer_id,
        account_id=str(account_id),
        ip=ip or "",
        user_agent=user_agent or "",
        datetime=datetime,
        country_code=country_code or "",
        sendid=message_id or "",
    )
    return values


def fill(template: Template, values: Mapping[str, str]) -> str:
    """The destination for one click. ``values`` maps lower-case macro names to raw values."""
    if not template.names:
        return _append(template.raw, values)
    out = [template.literals[0]]
    for name, literal in zip(template.names, template.literals[1:]):
        value = values.get(name)
        if value:
            out.append(encode(value))
        out.append(literal)
    return "".join(out)


def fill_facts(template: Template, facts: ClickFacts, query: Mapping[str, str]) -> str:
    """``fill(template, click_values(...))`` without building every value: what the redirect
    calls per click. ``query`` holds the short link's query parameters. ``facts`` may be a plain
    tuple in ClickFacts' field order: it is only indexed."""
    if not template.names:
        params = [f"click_id={encode(facts[0])}"]
        for name in SUBS:
            value = query.get(name)
            if value:
                params.append(f"{name}={encode(value)}")
        return _join_query(template.raw, "&".join(params))
    out = template.literals[0]  # built with += (CPython extends in place): cheaper than a join here
    for slot, literal in template.steps:
        if slot.__class__ is int:
            value = facts[slot]  # type: ignore[index]
        elif slot is None:
            value = None
        else:
            value = query.get(slot)  # type: ignore[arg-type]
        if value:  # every fact and query value is a str
            # Left as it is when ASCII and alphanumeric (ids, hex, digits) or otherwise unreserved.
            # bytes.isalnum is a table lookup per byte; str.isalnum consults the Unicode database
            # per character (a 32-digit click id: a third of the cost), and for ASCII they agree.
            if not (value.isascii() and value.encode().isalnum()):
                if value in _DOT_SEGMENTS:
                    value = ""
                elif not (value.isascii() and _unreserved(value)):
                    value = quote(value, safe="")
            out += value
        out += literal
    return out


def _join_query(url: str, query: str) -> str:
    base, hash_sign, fragment = url.partition("#")
    if base.endswith(("?", "&")):
        joiner = ""
    elif "?" in base:
        joiner = "&"
    else:
        joiner = "?"
    return f"{base}{joiner}{query}{hash_sign}{fragment}"


def _append(url: str, values: Mapping[str, str]) -> str:
    params = [("click_id", values.get("click_id", ""))]
    params += [(name, values[name]) for name in SUBS if values.get(name)]
    return _join_query(url, "&".join(f"{encode(k)}={encode(v)}" for k, v in params))


def render(template: str, values: Mapping[str, str]) -> str:
    """``fill(parse(template), values)``, for callers that do not cache the parsed template."""
    return fill(parse(template), values)
