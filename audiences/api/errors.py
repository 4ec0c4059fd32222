"""Errors in Knock's shape: `{"code", "message", "status", "type", "errors": [{"field", ...}]}`."""

from __future__ import annotations

from pydantic import BaseModel, Field


class FieldError(BaseModel):
    field: str
    message: str
    type: str


class ErrorBody(BaseModel):
    """Every error the API answers with."""

    code: str = Field(
        description="A machine-readable code, e.g. `invalid_params`, `resource_missing`."
    )
    message: str
    status: int
    type: str = Field(
        description="The error family, e.g. `invalid_params_error`, `authentication_error`."
    )
    errors: list[FieldError] = Field(
        default_factory=list, description="The offending fields, for 422 answers."
    )


class ApiError(Exception):
    """An answer other than success; raised anywhere in a request and turned into `ErrorBody`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = (
            status,
            code,
            message,
            field,
            headers or {},
        )

    def body(self) -> dict:
        return error_body(
            self.status,
            self.code,
            self.message,
            [{"field": self.field, "message": self.message, "type": self.code}]
            if self.field
            else [],
        )


TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "api_error",
    405: "api_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_params_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
}


def error_body(status: int, code: str, message: str, errors: list[dict] | None = None) -> dict:
    return {
        "code": code,
        "message": message,
        "status": status,
        "type": TYPES.get(status, "api_error"),
        "errors": errors or [],
    }


def not_found(what: str) -> ApiError:
    return ApiError(404, "resource_missing", f"{what} does not exist")


def invalid(field: str, message: str, code: str = "invalid_params") -> ApiError:
    return ApiError(422, code, f"{field}: {message}", field=field)
