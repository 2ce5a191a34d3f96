"""Phone numbers in E.164, checked with ``phonenumbers``."""
from __future__ import annotations

import re

import phonenumbers

_E164_RE = re.compile(r"^\+[1-9]\d{6,14}$")


class PhoneError(ValueError):
    pass


def parse_e164(value: object) -> str:
    """Return the canonical E.164 form or raise ``PhoneError``.

    The input must already be E.164 (``+`` and digits, as the spec demands). ``phonenumbers``
    then checks the number is possible for its country; we do not require ``is_valid_number``
    because that rejects reserved test ranges (555 numbers) that SMS platforms use in staging.
    """
    if not isinstance(value, str) or not _E164_RE.match(value.strip()):
        raise PhoneError("phone number must be in E.164 format, e.g. +14155551234")
    try:
        number = phonenumbers.parse(value.strip(), None)
    except phonenumbers.NumberParseException:
        raise PhoneError("phone number must be in E.164 format, e.g. +14155551234") from None
    if not phonenumbers.is_possible_number(number):
        raise PhoneError("phone number is not a possible number for its country")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
