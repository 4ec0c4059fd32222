"""The API's rules for ids and date-times, in one place: request shapes, path parameters, Census
records and bulk operations all check them here.

Knock's rule for user ids (docs.knock.app/concepts/users): "it cannot contain a '/' or '#'". Such
an id could be added but never read back through a URL path (a `/` ends a path segment, a `#`
starts the fragment), so it is refused when written, with a 422 naming the id, and a path that
carries one percent-encoded answers the same 422 rather than the router's 404 (`encoded_slash`).
Tenant ids follow the same rule, since they travel in paths too (`/v1/tenants/{id}`).

A user id is also refused when the warehouse's loader would quarantine it
(`audiences/users/validation.py`): leading or trailing whitespace, or a control character. Such an
id was answered 200, entered audiences in real time (with workflow triggers), and was then
quarantined by every run, so the warehouse never held the user and its audiences disagreed with
the store's.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated
from urllib.parse import unquote

from pydantic import AfterValidator, StringConstraints, WithJsonSchema

MAX_ID_LENGTH = 255
BLANK = "\t\n\x0b\x0c\r "  # ASCII whitespace: an id of only these is blank
# Not blank, no whitespace at either end, no control character, and neither '/' nor '#' (Knock's
# rule). Spelled out as a pattern too, so that the OpenAPI document says what the validation does.
ID_PATTERN = r"^[^\x00-\x1f\x7f/#\s]([^\x00-\x1f\x7f/#]*[^\x00-\x1f\x7f/#\s])?$"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?$")


def id_problem(value: object) -> str | None:
    """Why `value` cannot be a user or tenant id, or None when it can."""
    if not isinstance(value, str) or not value.strip(BLANK):
        return "an id is a non-blank string"
    if len(value) > MAX_ID_LENGTH:
        return f"an id is at most {MAX_ID_LENGTH} characters"
    if _CONTROL.search(value):
        return f"{value!r} contains a control character"
    if value != value.strip():
        return f"{value!r} has leading or trailing whitespace"
    for character in "/#":
        if character in value:
            return f"{value!r} contains {character!r}: Knock's ids cannot contain '/' or '#'"
    return None


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
