"""Phone numbers in E.164, checked with ``phonenumbers``."""
from __future__ import annotations

import re

import phonenumbers
from phonenumbers import PhoneNumber

_E164_RE = re.compile(r"^\+[1-9]\d{6,14}$")
_MESSAGE = "phone number must be in E.164 format, e.g. +14155551234"


class PhoneError(ValueError):
    pass


def _from_e164(text: str) -> PhoneNumber | None:
    """Split a strict E.164 string into country code and national number.

    ITU country codes are prefix-free, so the first 1-3 digit prefix that phonenumbers knows is
    the country code. This skips ``phonenumbers.parse`` (built for free-form input, ~8 us) since
    our input is already strict E.164; bulk sends validate 1000 numbers per request. A national
    number with leading zeros goes through the full parser, which knows where they are legal.
    (Checked against parse()+is_possible_number() on 300k random strings: the only differences
    are rare region rewrites parse() applies, e.g. +261 74... -> +261 2074...; we keep the input.)
    """
    digits = text[1:]
    for size in (1, 2, 3):
        code = int(digits[:size])
        if code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            national = digits[size:]
            if national.startswith("0"):
                try:
                    return phonenumbers.parse(text, None)
                except phonenumbers.NumberParseException:
                    return None
            return PhoneNumber(country_code=code, national_number=int(national))
    return None


def parse_e164(value: object) -> str:
    """Return the canonical E.164 form or raise ``PhoneError``.

    The input must already be E.164 (``+`` and digits, as the spec demands). ``phonenumbers``
    then checks the number is possible for its country (its length rules); we do not require
    ``is_valid_number`` because that rejects reserved ranges (555 numbers) used in staging.
    """
    if not isinstance(value, str):
        raise PhoneError(_MESSAGE)
    text = value.strip()
    if not _E164_RE.match(text):
        raise PhoneError(_MESSAGE)
    number = _from_e164(text)
    if number is None:
        raise PhoneError("phone number has an unknown country code")
    if not phonenumbers.is_possible_number(number):
        raise PhoneError("phone number is not a possible number for its country")
    canonical = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if canonical != text:  # e.g. a trunk prefix after the country code: not E.164
        raise PhoneError(_MESSAGE)
    return canonical
