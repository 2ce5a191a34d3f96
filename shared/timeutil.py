"""Time is UTC, ISO 8601."""
from __future__ import annotations

from datetime import UTC, date, datetime


class TimeError(ValueError):
    pass


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_timestamp(value: object, *, allow_unix: bool = False) -> datetime:
    """ISO 8601 (naive means UTC) or, where allowed, unix seconds. Always returns aware UTC."""
    if allow_unix and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _from_unix(float(value))
    if not isinstance(value, str) or not value.strip():
        raise TimeError("timestamp must be an ISO 8601 datetime")
    text = value.strip()
    if allow_unix and text.replace(".", "", 1).isdigit():
        return _from_unix(float(text))
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise TimeError("timestamp must be an ISO 8601 datetime") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _from_unix(seconds: float) -> datetime:
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        raise TimeError("timestamp is out of range") from None


def parse_date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise TimeError("date must be YYYY-MM-DD") from None


def isoformat(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
