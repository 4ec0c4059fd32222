"""The API's types for ids and date-times: request shapes, path parameters, Census records and bulk
operations all check them here, by the rules of `audiences/identifiers.py` (the one place they are
spelled, shared with the CLI, uploads, the store and the warehouse's loader).

An id Knock would refuse ('/' or '#'), or that the warehouse's loader would quarantine (whitespace
at either end, a control character), is refused when written, with a 422 naming it; a path that
carries a '/' percent-encoded answers the same 422 rather than the router's 404 (`encoded_slash`).
A member's tenant given as a string is checked as one given as an object (`TenantId`).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated
from urllib.parse import unquote

from pydantic import AfterValidator, StringConstraints, WithJsonSchema

from audiences.identifiers import (
    ID_PATTERN,
    MAX_ID_LENGTH,
    TENANT_PATTERN,
    id_problem,
    tenant_problem,
)

__all__ = ["ID_PATTERN", "MAX_ID_LENGTH", "DateTime", "Id", "TenantId", "id_problem"]

_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?$")


def _checked_id(value: str) -> str:
    problem = id_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _checked_date_time(value: str) -> str:
    match = _DATE_TIME.fullmatch(value)
    try:
        if match is None:
            raise ValueError
        # Seconds of 60 (a leap second, which RFC 3339 allows) read as 59 for the range check.
        datetime.fromisoformat(re.sub(r":60(?=\D|$)", ":59", value[:19].replace(" ", "T")))
    except ValueError:
        raise ValueError(
            f"{value!r} is not a date-time (RFC 3339, e.g. 2024-05-01T10:00:00Z)"
        ) from None
    return value


# A user's or tenant's id in a request body.
Id = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_LENGTH),
    AfterValidator(_checked_id),
    WithJsonSchema(
        {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH, "pattern": ID_PATTERN}
    ),
]


def _checked_tenant(value: str) -> str:
    problem = tenant_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# A member's tenant as a string (in a body or a query): blank is no tenant, anything else is an id
# (the same rule as a tenant given as an object, `{"id": ...}`, or set by `PUT /v1/tenants/{id}`).
TenantId = Annotated[
    str,
    StringConstraints(max_length=MAX_ID_LENGTH),
    AfterValidator(_checked_tenant),
    WithJsonSchema({"type": "string", "maxLength": MAX_ID_LENGTH, "pattern": TENANT_PATTERN}),
]
# Knock's `created_at`: a date-time, kept as the text that was sent.
DateTime = Annotated[
    str,
    AfterValidator(_checked_date_time),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


def encoded_slash(raw_path: bytes, path_regexes: list) -> tuple[str, str] | None:
    """For a path that no route matched: if one of its segments held a percent-encoded `/`
    (`/v1/users/team%2Fada`), the path parameter it was meant for and its decoded value."""
    raw = raw_path.decode("latin-1")
    if "%2f" not in raw.lower():
        return None
    segments = raw.split("/")
    # The same path with each encoded slash made harmless, so that the route it was meant for
    # matches, and the parameter holding the placeholder names the field.
    placeholder = "\x00slash\x00"
    probe = "/".join(
        unquote(re.sub("%2[fF]", placeholder, segment), errors="replace") for segment in segments
    )
    for regex in path_regexes:
        match = regex.match(probe)
        if match is None:
            continue
        for name, value in match.groupdict().items():
            if placeholder in value:
                return name, value.replace(placeholder, "/")
    return None
