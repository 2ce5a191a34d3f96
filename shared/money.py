"""Exact money: JSON numbers or decimal strings in, ``Decimal`` everywhere, JSON numbers out."""
from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Context, Decimal, InvalidOperation

_DECIMAL_RE = re.compile(r"^-?([0-9]+(\.[0-9]*)?|\.[0-9]+)\Z")  # ASCII digits (\d takes any script's)
# An amount is stored exactly as given (NUMERIC without a scale), within these bounds: less than a
# trillion, and at most MAX_PLACES digits after the point (a client's binary float noise, such as
# 0.1 + 0.2 = 0.30000000000000004, is 17 places; nothing real comes near 30).
MONEY_LIMIT = Decimal(10) ** 12
MAX_PLACES = 30
# Arithmetic on amounts (a ledger's difference, a sum) in Python: Python's default context rounds
# every result to 28 digits, and one amount may have 42 (12 + 30). 100 digits hold any sum of them.
MONEY = Context(prec=100)
CURRENCY_RE = re.compile(r"[A-Z]{3}")  # an ISO 4217 code's form (fullmatch, after upper-casing)


class MoneyError(ValueError):
    pass


class MoneyTooLarge(MoneyError):
    pass


class MoneyTooPrecise(MoneyError):
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
    if amount.copy_abs() >= MONEY_LIMIT:
        raise MoneyTooLarge(f"amount must be less than {MONEY_LIMIT}")
    places = decimal_places(amount)
    if places > MAX_PLACES:
        raise MoneyTooPrecise(f"amount must have at most {MAX_PLACES} decimal places")
    exponent = amount.as_tuple().exponent
    if exponent < -MAX_PLACES or exponent > 0:
        # Its value fits, its form may not: 1.000... with 20,000 zeros, 0e-20000 or 0e999999999
        # is 1 or 0, but PostgreSQL's numeric holds at most 16,383 places (asyncpg refuses to
        # send more) and such a huge exponent. Only zeros go: the value is unchanged.
        amount = amount.quantize(Decimal(1).scaleb(-places), context=MONEY)
    return amount  # exactly what was sent: never rounded


def decimal_places(amount: Decimal) -> int:
    """Digits after the point, trailing zeros not counted (``1.50`` has 1), without rounding."""
    _, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)  # finite
    zeros = 0
    for digit in reversed(digits):
        if digit:
            break
        zeros += 1
    return max(0, -(exponent + zeros)) if zeros < len(digits) else 0


def money_sum(amounts: Iterable[Decimal]) -> Decimal:
    """The exact sum (``sum`` would round it to Python's default 28 digits)."""
    total = Decimal(0)
    for amount in amounts:
        total = MONEY.add(total, amount)
    return total


def to_json_number(amount: Decimal) -> Decimal:
    """Normalise for output: ``24.990000`` from NUMERIC prints as ``24.99``; orjson is told to
    emit Decimals as numbers by the JSON helpers."""
    normal = amount.normalize(MONEY)  # (the default context would round past 28 digits)
    # normalize() turns 100 into 1E+2: back to plain digits (exactly, through int: quantize would
    # need more than the context's 28 digits of precision for 1E+28).
    if normal.as_tuple().exponent > 0:
        normal = Decimal(int(normal))
    return normal
