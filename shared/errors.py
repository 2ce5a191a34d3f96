"""Errors are values with codes (CONTRACT.md §3), raised anywhere, rendered in one place."""
from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after  # seconds, sent as Retry-After

    def body(self) -> dict[str, object]:
        return {"success": False, "code": self.code, "error": self.message}


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def not_found(code: str = "not_found", message: str = "Not found") -> ApiError:
    return ApiError(404, code, message)


def validation(message: str) -> ApiError:
    return ApiError(400, "validation_error", message)


def unavailable(message: str = "A dependency is unavailable; retry shortly") -> ApiError:
    return ApiError(503, "service_unavailable", message)
