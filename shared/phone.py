"""Phone numbers in E.164, checked with ``phonenumbers``."""
from __future__ import annotations

import functools
import re

import phonenumbers
from phonenumbers import PhoneNumber

_E164_RE = re.compile(r"^\+[1-9][0-9]{6,14}\Z")  # [0-9], not \d (any script's digits)
_MESSAGE = "phone number must be in E.164 format, e.g. +14155551234"


class PhoneError(ValueError):
    pass


def _split_e164(digits: str) -> tuple[int, str] | None:
    """(country code, national number) of strict E.164 digits. ITU country codes are prefix-free,
    so the first 1-3 digit prefix that phonenumbers knows is the country code."""
    for size in (1, 2, 3):
        code = int(digits[:size])
        if code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return code, digits[size:]
    return None


@functools.lru_cache(maxsize=4096)
def _possible_length(country_code: int, national_digits: int) -> bool:
    """``_is_full_number`` for a national number without leading zeros. phonenumbers looks only
    at the country code and the national number's length (``_test_number_length``), so the answer
    is remembered per pair rather than recomputed for each of a bulk request's numbers."""
    return _is_full_number(PhoneNumber(country_code=country_code, national_number=int("9" * national_digits)))


def _is_full_number(number: PhoneNumber) -> bool:
    """A possible number with its area code: ``IS_POSSIBLE_LOCAL_ONLY`` (e.g. +1 and 7 digits,
    dialable only inside its area) is not a complete international number."""
    reason = phonenumbers.is_possible_number_with_reason(number)
    return bool(reason == phonenumbers.ValidationResult.IS_POSSIBLE)


def parse_e164(value: object) -> str:
    """Return the canonical E.164 form or raise ``PhoneError``.

    The input must already be E.164 (``+`` and digits, as the spec demands). ``phonenumbers``
    then checks the number is possible for its country (its length rules, area code included);
    we do not require ``is_valid_number`` because that rejects reserved ranges (555 numbers)
    used in staging.

    ``phonenumbers.parse`` (built for free-form input) runs only for a national number with a
    leading zero, where it knows whether the zero is legal; any other strict E.164 string is
    already canonical and only its length is checked. (Checked against parse() +
    is_possible_number_with_reason() + format_number() on 300k random strings: the same answers
    but for 15 numbers where parse() reads a carrier or trunk prefix into the national number, e.g.
    +55 90..., and the input would fail as "not canonical"; as E.164 we take the digits as given.)
    """
    if not isinstance(value, str):
        raise PhoneError(_MESSAGE)
    text = value.strip()
    if not _E164_RE.match(text):
        raise PhoneError(_MESSAGE)
    split = _split_e164(text[1:])
    if split is None:
        raise PhoneError("phone number has an unknown country code")
    code, national = split
    if not national.startswith("0"):
        if not _possible_length(code, len(national)):
            raise PhoneError("phone number is not a possible number for its country")
        return text
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        raise PhoneError(_MESSAGE) from None
    if not _is_full_number(number):
        raise PhoneError("phone number is not a possible number for its country")
    canonical = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if canonical != text:  # e.g. a trunk prefix after the country code: not E.164
        raise PhoneError(_MESSAGE)
    return canonical
