"""The rules for user and tenant ids, in one place: the API (request shapes, paths, Census records,
bulk operations), the CLI, uploads, the store's writes and the warehouse's loader
(`audiences/users/validation.py`, which spells the same rules as polars expressions) import them.

- A user id is a non-blank string (blank: only ASCII whitespace, `BLANK`) of at most
  `MAX_ID_LENGTH` characters. The loader quarantines one with whitespace at either end or a control
  character (`CONTROL_CHARACTERS`), and the API and the CLI refuse it when it is written (`id_problem`).
- Knock's rule (docs.knock.app/concepts/users): an id "cannot contain a '/' or '#'": such an id could
  be added but never read back through a URL path. Tenant ids follow the same rule, since they travel
  in paths too (`/v1/tenants/{id}`).
- A member's tenant, however it is given (a string, an object's `id`, an upload's tenant column,
  `--tenant`), is either blank, which is no tenant (`audiences/store/database.normalize_tenant`), or
  an id by the rules above (`tenant_problem`).
"""

from __future__ import annotations

import re

MAX_ID_LENGTH = 255
BLANK = "\t\n\x0b\x0c\r "  # ASCII whitespace: an id of only these is blank
CONTROL_CHARACTERS = r"[\x00-\x1f\x7f]"  # a character class for Python's re and polars alike
# The whitespace `str.strip()` strips beyond the control characters (`str.isspace`), spelled out:
# JSON Schema's `\s` (ECMA-262) lacks \x85, so a pattern with `\s` let through ids that
# `id_problem` refuses.
_WHITESPACE = r" \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_INSIDE = r"\x00-\x1f\x7f/#"
# Not blank, no whitespace at either end, no control character, and neither '/' nor '#' (Knock's
# rule). Spelled out as a pattern too, so that the OpenAPI document says what the validation does.
ID_PATTERN = rf"^[^{_INSIDE}{_WHITESPACE}]([^{_INSIDE}]*[^{_INSIDE}{_WHITESPACE}])?$"
# A member's tenant: blank (no tenant) or an id.
TENANT_PATTERN = r"^[\t\n\x0b\x0c\r ]*$|" + ID_PATTERN
_CONTROL = re.compile(CONTROL_CHARACTERS)


def is_blank(value: str) -> bool:
    """Whether a string is blank: empty or only ASCII whitespace (`str.strip()` alone would also
    strip control characters such as \\x1d)."""
    return not value.strip(BLANK)


def id_problem(value: object) -> str | None:
    """Why `value` cannot be a user or tenant id, or None when it can."""
    if not isinstance(value, str) or is_blank(value):
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


def tenant_problem(value: object) -> str | None:
    """Why `value` cannot be a member's tenant, or None when it can: None and a blank string are
    no tenant; any other string is checked as an id (the same rule as a tenant given as an object,
    or set by `PUT /v1/tenants/{id}`)."""
    if value is None or (isinstance(value, str) and is_blank(value)):
        return None
    if not isinstance(value, str):
        return "a tenant is a string"
    return id_problem(value)
