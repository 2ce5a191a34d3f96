"""Time is UTC, ISO 8601."""
from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_FLOOR, Context, Decimal, InvalidOperation

# "2026-02-08T12:00:00 02:00": an offset whose "+" a query string decoded to a space (networks
# and curl often send it unencoded).
_SPACED_OFFSET_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?) (\d{2}(?::?\d{2})?)$")
# Unix seconds as a number is written: digits, a fraction, an exponent (Java writes a double
# 1770552000 as 1.770552E9). ASCII digits only (str.isdigit takes other scripts'); possessive, so
# 5 MB of digits with a letter at the end is refused in one pass, not by backtracking through them.
_UNIX_RE = re.compile(r"(?:[0-9]++(?:\.[0-9]*+)?+|\.[0-9]++)(?:[eE][+-]?+[0-9]++)?+")
# Unix times past this are milliseconds (as seconds they would be after the year 5000).
_UNIX_MILLIS_FROM = 100_000_000_000


# The times a client may give (the upper bound excluded): anything else is a typo or a unit
# mistake, and at the ends of the calendar converting to UTC, adding a window or grouping by day
# would overflow.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)


class TimeError(ValueError):
    pass


class TimeRangeError(TimeError):
    """A well-formed time outside [EARLIEST, LATEST)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


_TIMESTAMP_FORMATS = {
    False: "timestamp must be an ISO 8601 datetime",
    True: "timestamp must be an ISO 8601 datetime or unix seconds",
}


def parse_timestamp(value: object, *, allow_unix: bool = False) -> datetime:
    """ISO 8601 (naive means UTC) or, where allowed, unix seconds (or milliseconds, told apart by
    size). Always returns aware UTC."""
    if allow_unix and isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return _from_unix(value)
    if not isinstance(value, str) or not value.strip():
        raise TimeError(_TIMESTAMP_FORMATS[allow_unix])
    text = value.strip()
    if allow_unix and _UNIX_RE.fullmatch(text):
        return _from_unix(text)
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    elif spaced := _SPACED_OFFSET_RE.match(text):
        text = f"{spaced[1]}+{spaced[2]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise TimeError(_TIMESTAMP_FORMATS[allow_unix]) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return _in_range(parsed.astimezone(UTC))
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before the year 1 in UTC
        raise _out_of_range() from None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Unix seconds (or milliseconds) to whole microseconds, cut toward the past; its own context (a
# value is at most 21 digits before the point here, 27 with the fraction kept), so nothing rounds.
_UNIX_CONTEXT = Context(prec=40)


def _from_unix(value: int | float | Decimal | str) -> datetime:
    """Exactly, to the microsecond, cut as ``datetime.fromisoformat`` cuts finer digits (never
    rounded: through a binary float, 23:59:59.9999999 became the next day's 00:00:00)."""
    try:
        seconds = Decimal(value)  # exact (a float's binary value; text and ints as written)
        if not seconds.is_finite() or seconds.adjusted() > 20:  # (years past 2100 either way)
            raise _out_of_range()
        in_micros = seconds.scaleb(3 if seconds >= _UNIX_MILLIS_FROM else 6, context=_UNIX_CONTEXT)
        micros = int(in_micros.to_integral_value(rounding=ROUND_FLOOR, context=_UNIX_CONTEXT))
        return _in_range(_EPOCH + timedelta(microseconds=micros))
    except (OverflowError, ValueError, InvalidOperation):
        raise _out_of_range() from None


def _in_range(moment: datetime) -> datetime:
    if not EARLIEST <= moment < LATEST:
        raise _out_of_range()
    return moment


def _out_of_range() -> TimeRangeError:
    return TimeRangeError(f"timestamp must be from {EARLIEST.year} to {LATEST.year - 1} (UTC)")


def parse_date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise TimeError("date must be YYYY-MM-DD") from None


def isoformat(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
