"""JSON in and out without binary floats: numbers parse to Decimal, Decimals print as numbers."""
from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal

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
    # ValueError also covers integers past the interpreter's digit limit (JSONDecodeError is one).
    except (ValueError, RecursionError) as exc:
        raise JsonError(str(exc)) from None


def ts(moment: datetime | None) -> str | None:
    return isoformat(moment)
