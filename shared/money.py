"""Exact money: JSON numbers or decimal strings in, ``Decimal`` everywhere, JSON numbers out."""
from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

_DECIMAL_RE = re.compile(r"^-?([0-9]+(\.[0-9]*)?|\.[0-9]+)\Z")  # ASCII digits (\d takes any script's)
# NUMERIC(18, 6) in the schema: far more than any payout, and exact.
MAX_MONEY = Decimal("999999999999")
QUANT = Decimal("0.000001")
CURRENCY_RE = re.compile(r"[A-Z]{3}")  # an ISO 4217 code's form (fullmatch, after upper-casing)


class MoneyError(ValueError):
    pass


class MoneyTooLarge(MoneyError):
    pass


def parse_money(value: object, *, allow_negative: bool = False) -> Decimal:
    """Accept ``24.99`` or ``"24.99"``; reject bools, NaN, exponents-as-strings abuse, negatives.

    JSON numbers must reach this function as ``Decimal`` or ``int`` (the gateway parses JSON with
    ``parse_float=Decimal``), so no binary float ever touches an amount. A float that slips
    through is converted via its shortest repr, which is what the client wrote.
    """
    if isinstance(value, bool) or value is None:
        raise MoneyError("amount must be a number")
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, float):
        amount = Decimal(repr(value))
    elif isinstance(value, str):
        text = value.strip()
        if not _DECIMAL_RE.match(text):
            raise MoneyError("amount must be a decimal number")
        try:
            amount = Decimal(text)
        except InvalidOperation:
            raise MoneyError("amount must be a decimal number") from None
    else:
        raise MoneyError("amount must be a number")
    if not amount.is_finite():
        raise MoneyError("amount must be finite")
    if amount < 0 and not allow_negative:
        raise MoneyError("amount must be greater than or equal to 0")
    # copy_abs, unlike abs(), is exact: a JSON number such as 1e999999999 must not overflow here.
    if amount.copy_abs() > MAX_MONEY:
        raise MoneyTooLarge(f"amount must be at most {MAX_MONEY}")
    # Amounts are kept to the millionth (NUMERIC(18, 6)). Digits past that are a client's binary
    # float noise (0.1 + 0.2 = 0.30000000000000004), not money: rounded half-even, not refused.
    return amount.quantize(QUANT, rounding=ROUND_HALF_EVEN)


def to_json_number(amount: Decimal) -> Decimal:
    """Normalise for output: ``24.990000`` from NUMERIC prints as ``24.99``; orjson is told to
    emit Decimals as numbers by the JSON helpers."""
    normal = amount.normalize()
    # normalize() turns 100 into 1E+2: back to plain digits (exactly, through int: quantize would
    # need more than the context's 28 digits of precision for 1E+28).
    if normal.as_tuple().exponent > 0:
        normal = Decimal(int(normal))
    return normal
