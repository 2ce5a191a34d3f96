"""Request parsing and response rendering for the gateway: one place for JSON, limits, pages."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from shared import jsonio
from shared.errors import ApiError, validation

MAX_BODY = 5_000_000  # "5 MB" (overview): the decimal reading, so no reading of it lets more through
MAX_PAGE = 1_000_000_000  # keeps (page - 1) * per_page a valid OFFSET
_PAGE_RE = re.compile(r"[0-9]{1,12}")  # ASCII digits (str.isdigit takes "²", which int refuses)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return jsonio.dumps(content)


def error_response(err: ApiError) -> JSONResponse:
    headers = {"retry-after": str(err.retry_after)} if err.retry_after is not None else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _too_large() -> ApiError:
    return ApiError(413, "payload_too_large", "Request body exceeds the 5 MB (5,000,000 bytes) limit")


async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY:
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise _too_large()
            chunks.append(chunk)
    except ClientDisconnect:
        raise client_gone() from None
    return b"".join(chunks)


def client_gone() -> ApiError:
    """For a client that hung up before its body arrived: nobody reads the answer, and this is
    no server error (it was a traceback in the log)."""
    return ApiError(400, "client_disconnected", "The client disconnected before sending the whole body")


async def read_json_object(request: Request) -> dict[str, Any]:
    return parse_json_object(await read_body(request))


_UNSTORABLE = "strings must not contain NUL characters or unpaired surrogates"


class Unstorable:
    """Stands in for a bulk record holding text PostgreSQL cannot store, so that it fails alone
    (``refuse_unstorable``) instead of sinking the whole request."""

    __slots__ = ()


UNSTORABLE_RECORD = Unstorable()


def refuse_unstorable(record: object) -> None:
    if record is UNSTORABLE_RECORD:
        raise validation(_UNSTORABLE)


def parse_json_object(raw: bytes, *, records: str | None = None) -> dict[str, Any]:
    """The body as a JSON object. Text PostgreSQL cannot store is refused (400), except inside
    the array ``records`` names (a bulk request's): there each record holding some is replaced
    by ``UNSTORABLE_RECORD``."""
    if not raw.strip():
        raise ApiError(400, "invalid_json", "Request body must be a JSON object")
    try:
        data = jsonio.loads(raw)
    except jsonio.JsonError:
        raise ApiError(400, "invalid_json", "Request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "Request body must be a JSON object")
    # NUL can only arrive as a \u escape (raw control characters are not JSON) and a lone
    # surrogate as an escape or as UTF-8-encoded surrogate bytes (json reads those, and they start
    # with 0xED), so a body with none of these skips the walk over every string. (A UTF-16 or
    # UTF-32 body, which json also reads, has NUL bytes.)
    if (b"\\u" in raw or b"\x00" in raw or b"\xed" in raw) and not storable_text(data):
        items = data.get(records) if records is not None else None
        if not isinstance(items, list) or not storable_text({k: v for k, v in data.items() if k != records}):
            raise validation(_UNSTORABLE)
        data[records] = [item if storable_text(item) else UNSTORABLE_RECORD for item in items]  # type: ignore[index]
    return data


def _storable(text: str) -> bool:
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. "\ud800" in the JSON
        return False
    return True


def storable_text(value: object) -> bool:
    """Whether every string (keys too) in a parsed JSON value is text PostgreSQL can store:
    valid JSON may still carry NUL characters or unpaired surrogates, which it cannot."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not _storable(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


@dataclass(frozen=True)
class Page:
    page: int
    per_page: int

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    def envelope(self, total: int) -> dict[str, int]:
        return {
            "page": self.page,
            "per_page": self.per_page,
            "total": total,
            "total_pages": (total + self.per_page - 1) // self.per_page,
        }


def page_params(request: Request, *, max_per_page: int = 100) -> Page:
    def number(name: str, default: int) -> int:
        raw = request.query_params.get(name)
        if raw is None or raw == "":
            return default
        if not _PAGE_RE.fullmatch(raw) or int(raw) < 1:
            raise validation(f"{name} must be a positive integer")
        if int(raw) > MAX_PAGE:
            raise validation(f"{name} may be at most {MAX_PAGE}")
        return int(raw)

    # Above the maximum (spec: 100, 1000 for contacts) a page holds the maximum, and says so in
    # its pagination object: a client asking for "as many as you give" gets pages, not an error.
    per_page = min(number("per_page", 50), max_per_page)
    return Page(number("page", 1), per_page)


def present(value: Any) -> bool:
    """Whether a field was given a value: not absent (None), null or a blank string."""
    return value is not None and not (isinstance(value, str) and not value.strip())


def optional_str(data: dict[str, Any], name: str, *, max_len: int = 2000) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise validation(f"{name} must be a string")
    text = str(value).strip()
    if len(text) > max_len:
        raise validation(f"{name} is too long")
    return text or None
