"""Postback fields (CONTRACT.md §5): aliases, normalisation and the dedupe key.

The gateway normalises a postback when it stores it; the worker reads the normalised columns.
Both sides agree on the status machine defined here.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from shared.money import CURRENCY_RE, MoneyError, parse_money, to_json_number
from shared.timeutil import TimeError, parse_timestamp

ALIASES: dict[str, tuple[str, ...]] = {
    "click_id": ("click_id", "clickid", "cid", "transaction_id", "aff_sub"),
    "payout": ("payout", "payout_amount", "amount", "sum"),
    "conversion_id": ("conversion_id", "txid", "event_id"),
    "status": ("status",),
    "currency": ("currency",),
    "offer_id": ("offer_id",),
    "timestamp": ("timestamp",),
    "network": ("network",),
}

STATUSES = ("pending", "approved", "rejected", "reversed")
DEFAULT_NETWORK = "default"
# In UTF-8 bytes: network and conversion_key (conversion_id, else "click:" + click_id) are index
# keys together, and an index row holds at most about 2700 bytes. Two values of 500 CJK
# characters (1500 bytes each) overflowed it: a 500.
MAX_FIELD = 1500
MAX_NETWORK = 500

# A move is taken only forwards: a late ``pending`` after ``approved`` is ignored, and ``reversed``
# is final. ``approved`` and ``rejected`` share a rank, so a network can correct one to the other.
STATUS_RANK = {"pending": 0, "approved": 1, "rejected": 1, "reversed": 2}


def status_value(status: str, payout: Decimal) -> Decimal:
    """What a conversion is worth in the revenue ledger: its payout while approved, else 0."""
    return payout if status == "approved" else Decimal(0)


def accepts_move(old_status: str, old_payout: Decimal, new_status: str, new_payout: Decimal) -> bool:
    if old_status == "reversed":
        return False
    if new_status == old_status:
        return new_payout != old_payout
    return STATUS_RANK[new_status] >= STATUS_RANK[old_status]


@dataclass
class Postback:
    network: str
    conversion_key: str
    click_id: str | None
    status: str | None
    payout: Decimal | None
    currency: str | None
    offer_ref: str | None
    converted_at: datetime
    errors: list[str] = field(default_factory=list)

    @property
    def parse_error(self) -> str | None:
        return "; ".join(self.errors) or None

    def dedupe_key(self, after: int) -> str | None:
        """The same (network, conversion key, status, payout, click id, currency) sent again after the same
        latest accepted postback ``after`` (0: none yet) of that conversion is the same postback.
        Concurrent retries share this key, so exactly one is accepted; a correction back to an
        earlier state (approved -> rejected -> approved) follows a newer postback and is new.
        A postback that could not be parsed has none: it is kept, never deduplicated.
        A digest of them: the fields joined could pass the 2704 bytes a btree index entry may hold
        (two ids of 1400 characters did), and the insert failed (a 500, nothing stored, every
        retry the same)."""
        if self.errors:
            return None
        payout = "" if self.payout is None else str(to_json_number(self.payout))
        joined = "\x1f".join((
            self.network, self.conversion_key, self.status or "", payout, self.click_id or "", self.currency or "",
            f"after:{after}",
        ))
        return hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()

    def repeats(self, status: str | None, payout: Decimal | None, click_id: str | None, currency: str | None) -> bool:
        """Whether this postback says what the latest accepted one for its conversion said. One
        that names a click or a currency the latest did not is news (a network that learned the
        click id late: the worker attributes the conversion by it; a currency corrected); one
        that names none repeats any."""
        return (
            self.status == status and self.payout == payout
            and (self.click_id is None or self.click_id == click_id)
            and (self.currency is None or self.currency == currency)
        )


# A value that is a network's macro left unfilled, whole: ``{txid}``, ``{{transaction_id}}``,
# ``${payout}``, ``[clickid]``, ``[[sub1]]``, ``#s2#``, ``%aff_sub%``, ``%%txid%%`` (TUNE, Everflow,
# CAKE, Impact and trackers' own postback templates). In a field that names something (the
# conversion, its click, its offer, the network) the network had no value for it: it is absent.
# Kept as a value, one literal ``{txid}`` made every later conversion of the network a repeat of
# the first: their money was lost as duplicates. In the others (status, payout, currency,
# timestamp) it stays a value, which fails the postback (kept, shown failed in the log): an
# unfilled status must not count a rejection as approved, nor an unfilled payout or currency
# become the offer's default or USD. Except in a rejection or a reversal, worth 0 whatever its
# money or time: there they are absent too (``normalise``).
_MACRO_NAME = r"\s*[A-Za-z_][\w.:-]*\s*"
_UNFILLED_MACRO = re.compile(
    "|".join(f"{re.escape(left)}{_MACRO_NAME}{re.escape(right)}" for left, right in (
        ("{{", "}}"), ("{", "}"), ("${", "}"), ("[[", "]]"), ("[", "]"), ("#", "#"), ("%%", "%%"), ("%", "%"),
    ))
)
# A GUID in braces (the registry form, .NET's ``Guid.ToString("B")``) is a network's real id, never
# a macro's name, although one that starts with a letter has a macro's shape.
_BRACED_GUID = re.compile(r"\{[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}\}")
_NAMING_FIELDS = frozenset({"click_id", "conversion_id", "offer_id", "network"})


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _unfilled(value: Any) -> bool:
    """An unfilled macro (see _UNFILLED_MACRO)."""
    if not isinstance(value, str):
        return False
    text = value.strip()
    return (
        text[:1] in ("{", "$", "[", "#", "%") and _UNFILLED_MACRO.fullmatch(text) is not None
        and _BRACED_GUID.fullmatch(text) is None
    )


def _first(values: list[Any], *, unfilled_absent: bool = False) -> Any:
    """The first of repeated values that is not blank (a blank is absent: a template's empty
    ``click_id=`` in the query must not hide the ``click_id`` sent after it, or in the body);
    ``unfilled_absent``: nor an unfilled macro."""
    return next((v for v in values if not (_blank(v) or (unfilled_absent and _unfilled(v)))), None)


def first_value(value: Any, *, plain: bool = False, unfilled_absent: bool = False) -> str | None:
    """A field as a string: the first of repeated values; numbers as written; blanks are absent
    (``unfilled_absent``: unfilled macros too). ``plain``: a JSON number (a Decimal) in positional
    notation, its value exactly: str() writes 1e2 as "1E+2" and 0.0000001 as "1E-7", forms a
    decimal string may not take (a payout). (``jsonio.storable`` has left only Decimals within
    100 places of the point and 28 digits.)"""
    if isinstance(value, list):
        value = _first(value, unfilled_absent=unfilled_absent)
    if value is None or isinstance(value, (dict, bool)) or (unfilled_absent and _unfilled(value)):
        return None
    text = (format(value, "f") if plain and isinstance(value, Decimal) else str(value)).strip()
    return text or None


def lowered(params: dict[str, Any]) -> dict[str, Any]:
    """The fields by lower-cased name (of two names that differ only in case, the later wins):
    made once per postback, not once per field looked up (a postback of 400k keys held the
    gateway for a second doing it ten times)."""
    return {str(k).lower(): v for k, v in params.items()}


def pick(lowered: dict[str, Any], name: str, *, plain: bool = False, unfilled_absent: bool = False) -> str | None:
    """The first alias of ``name`` with a value, from ``lowered(params)`` (``plain``: see first_value).
    An unfilled macro is no value in a field that names something, and wherever ``unfilled_absent``."""
    unfilled_absent = unfilled_absent or name in _NAMING_FIELDS
    for alias in ALIASES[name]:
        value = first_value(lowered.get(alias), plain=plain, unfilled_absent=unfilled_absent)
        if value is not None:
            return value
    return None


def _unusable(lowered: dict[str, Any]) -> list[str]:
    """Fields sent as a JSON true/false, object or empty array: neither a string nor a number, so
    not a value (``pick`` treats them as absent, and ``payout: true`` must not pass as no payout)."""
    errors = []
    for name, aliases in ALIASES.items():
        for alias in aliases:
            if alias in lowered:
                value = lowered[alias]
                if isinstance(value, list):
                    value = _first(value) if value else {}
                if isinstance(value, (bool, dict)):
                    errors.append(f"{alias}: must be a string or a number")
                break
    return errors


def normalise(params: dict[str, Any], received_at: datetime, body_error: str | None = None) -> Postback:
    """``body_error``: why the receiver could not read the body as fields (the first error)."""
    errors: list[str] = [body_error] if body_error else [] if params else ["no fields: nothing to record as a conversion"]
    fields = lowered(params)
    errors += _unusable(fields)

    # A rejection or a reversal is worth 0 whatever it says of money or time: an unfilled payout,
    # currency or timestamp in one made up nothing, and failing it kept the conversion approved,
    # its revenue counted (a network's one template for every status, its payout macro empty on a
    # reversal).
    worth_nothing = (pick(fields, "status") or "").strip().lower() in ("rejected", "reversed")

    def bounded(name: str, limit: int = MAX_FIELD) -> str | None:
        value = pick(fields, name, unfilled_absent=worth_nothing)
        encoded = value.encode("utf-8", "replace") if value is not None else b""
        if len(encoded) > limit:
            errors.append(f"{name}: longer than {limit} bytes (UTF-8)")
            return encoded[:limit].decode("utf-8", "ignore")
        return value

    click_id = bounded("click_id")
    conversion_id = bounded("conversion_id")
    network = bounded("network", MAX_NETWORK) or DEFAULT_NETWORK
    offer_ref = bounded("offer_id")
    currency = bounded("currency")
    if currency is not None:
        if CURRENCY_RE.fullmatch(currency.upper()):
            currency = currency.upper()
        else:  # not summed with real ones under a made-up code: kept for the operator instead
            errors.append(f"currency: {currency!r} is not a 3-letter ISO 4217 code")
            currency = None

    status_raw = bounded("status")
    status: str | None = "approved" if status_raw is None else status_raw.lower()
    if status not in STATUSES:
        errors.append(f"status: {status_raw!r} is not one of {', '.join(STATUSES)}")
        status = None

    payout: Decimal | None = None
    payout_raw = pick(fields, "payout", plain=True, unfilled_absent=worth_nothing)
    if payout_raw is not None:
        try:
            payout = parse_money(payout_raw, allow_negative=True)
        except MoneyError as exc:
            errors.append(f"payout: {exc}")
        else:
            if payout < 0 and status == "reversed":
                # Networks often report a reversal as the negative of the payout; the ledger
                # reverses the approved value either way, so keep the magnitude.
                payout = payout.copy_negate()  # exact (unary minus rounds to the context's 28 digits)
            elif payout < 0:
                errors.append("payout: amount must be greater than or equal to 0")
                payout = None

    converted_at = received_at
    ts_raw = pick(fields, "timestamp", unfilled_absent=worth_nothing)
    if ts_raw is not None:
        try:
            converted_at = parse_timestamp(ts_raw, allow_unix=True)
        except TimeError as exc:
            errors.append(f"timestamp: {exc}")

    if click_id is None and conversion_id is None and offer_ref is None and payout_raw is None and not errors:
        # Only a status, a time, a network or fields of no meaning to us (a monitor's ping, a
        # network's "test postback" button, a template whose macros were all left blank): no
        # conversion to name, and no money. Kept for the log, never counted as a conversion of 0.
        errors.append("no click_id, conversion_id, offer_id or payout: nothing to record as a conversion")
    if conversion_id is not None:
        key = conversion_id
    elif click_id is not None:
        key = f"click:{click_id}"
    else:
        key = f"postback:{secrets.token_hex(16)}"  # nothing to match it with: its own conversion
    return Postback(network, key, click_id, status, payout, currency, offer_ref, converted_at, errors)
