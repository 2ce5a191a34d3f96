"""JSON in and out without binary floats: numbers parse to Decimal, Decimals print as numbers."""
from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal, InvalidOperation

import orjson

from shared.money import to_json_number
from shared.timeutil import isoformat


class JsonError(ValueError):
    pass


def _default(value: object) -> object:
    if isinstance(value, datetime):
        return isoformat(value)
    if isinstance(value, Decimal):
        return orjson.Fragment(str(to_json_number(value)))
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dumps(value: object) -> bytes:
    return orjson.dumps(value, default=_default, option=orjson.OPT_PASSTHROUGH_DATETIME)


def _reject_constant(name: str) -> object:
    raise JsonError(f"{name} is not valid JSON")


def loads(raw: bytes) -> object:
    """Strict JSON; every non-integer number becomes an exact ``Decimal``."""
    try:
        return json.loads(raw, parse_float=Decimal, parse_constant=_reject_constant)
    # ValueError also covers integers past the interpreter's digit limit (JSONDecodeError is one);
    # InvalidOperation (no ValueError) a number whose exponent is past what a Decimal holds (1e10**19).
    except (ValueError, RecursionError, InvalidOperation) as exc:
        raise JsonError(str(exc)) from None


def _stored_int(text: str) -> int | Decimal:
    # Integers orjson can write stay ints; a longer one (PostgreSQL prints a stored 1E+100 as 101
    # digits) is a Decimal, which ``dumps`` prints as the same digits.
    return int(text) if len(text) < 19 else Decimal(text)


def loads_stored(text: str) -> object:
    """JSON that PostgreSQL stored (a jsonb column read as text), its numbers exactly as stored:
    ``dumps`` writes them back as the same numbers (orjson.loads reads them as binary floats)."""
    return json.loads(text, parse_float=Decimal, parse_int=_stored_int)


# Numbers kept as numbers by ``storable``: integers orjson can write (64-bit) and decimals well
# within numeric's range and the context's precision; a number past them is kept as the text sent.
_MAX_INT = 2**63
_MAX_ADJUSTED = 100
_MAX_DIGITS = 28


def storable(value: object) -> object:
    """Decoded JSON as PostgreSQL's jsonb can hold it, at any depth: no NUL characters, no
    unpaired surrogates (in keys too), and numbers too large for it (or for ``dumps``) as the
    text that was sent."""
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "")
        if not value.isascii():
            value = value.encode("utf-8", "replace").decode("utf-8")
        return value
    if isinstance(value, int) and not isinstance(value, bool) and not -_MAX_INT <= value < _MAX_INT:
        return str(value)
    if isinstance(value, Decimal) and (abs(value.adjusted()) > _MAX_ADJUSTED or len(value.as_tuple().digits) > _MAX_DIGITS):
        return str(value)  # (printing it as a number would round it to the context's 28 digits)
    if isinstance(value, dict):
        return {storable(str(k)): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value


def ts(moment: datetime | None) -> str | None:
    return isoformat(moment)
