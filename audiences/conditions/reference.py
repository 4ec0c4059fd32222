"""Reference evaluator for audience conditions, written straight from docs/conditions.md.

Why this module exists
----------------------
The real engine compiles audience conditions to SQL (``audiences/conditions/compiler.py``) and
runs them in the warehouse. SQL is easy to get subtly wrong (NULL handling, type coercion, string
vs number comparisons, timestamp parsing), so this module is a second, *independent* reading of
the same spec: a plain-Python interpreter that evaluates one audience definition against one
user held in memory. Property-based tests generate users and conditions, run both, and require
the same answer.

To stay a useful oracle it deliberately:

* imports nothing from the rest of the project (standard library only);
* follows the spec rule by rule, in the spec's words, favouring clarity over speed;
* evaluates every condition of a segment (no short-circuit), so an invalid condition raises
  ``ValueError`` whatever the user's data is.

A *user* is a dict: the Knock user object, with ``"id"`` and all properties at top level
(nested custom properties as dicts, lists as lists). ``now`` is the evaluation time, a
timezone-aware datetime (normally UTC).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

__all__ = [
    "MISSING",
    "decode_argument",
    "evaluate_audience",
    "evaluate_condition",
    "evaluate_pairs",
    "numeric_value",
    "read_property",
    "resolve_time_argument",
    "timestamp_value",
]


# ---------------------------------------------------------------------------------------------
# Missing values
# ---------------------------------------------------------------------------------------------


class _Missing:
    """The single "missing" value: a property that is not set, is null, or is unreachable."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()

# Knock's rule: a missing property reads as "" for the text operators.
_MISSING_AS_TEXT = ""

# Knock's rule: these reserved user fields cannot be used in dynamic audience conditions.
_RESERVED_PROPERTIES = frozenset({"created_at", "updated_at"})

_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------
# Reading a property
# ---------------------------------------------------------------------------------------------


def _strip_prefix(path: str) -> str:
    """`recipient.plan` and `plan` are the same property."""
    if path.startswith("recipient."):
        return path[len("recipient.") :]
    return path


def read_property(user: dict, path: str) -> Any:
    """Read `path` from `user`; returns the value or `MISSING`.

    * the `recipient.` prefix is optional;
    * the path is split on `.` and each part indexes into an object (dict);
    * `null` is missing; a path through a missing value, `null`, or a non-object is missing;
    * `recipient.id` / `id` is the user id (the user dict's "id").
    """
    parts = _strip_prefix(path).split(".")
    current: Any = user
    for part in parts:
        if not isinstance(current, dict):
            return MISSING  # through a non-object (string, number, list, ...)
        if part not in current:
            return MISSING
        current = current[part]
        if current is None:
            return MISSING  # null is missing
    return current


def _valid_unicode(value: Any) -> bool:
    """Text that UTF-8 can hold (no lone surrogate), through lists and objects."""
    if isinstance(value, str):
        return not any(0xD800 <= ord(character) <= 0xDFFF for character in value)
    if isinstance(value, list):
        return all(_valid_unicode(item) for item in value)
    if isinstance(value, dict):
        return all(_valid_unicode(key) and _valid_unicode(item) for key, item in value.items())
    return True


def _check_not_reserved(path: str) -> None:
    first = _strip_prefix(path).split(".")[0]
    if first in _RESERVED_PROPERTIES:
        raise ValueError(f"property {path!r} cannot be used in audience conditions")


# ---------------------------------------------------------------------------------------------
# Kinds of values and their keys
# ---------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    """A JSON number. Booleans are never numbers."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    """A scalar in the operator table's sense: string, number or boolean (not null)."""
    return isinstance(value, (str, bool)) or _is_number(value)


def _to_float(number: int | float) -> float:
    """A JSON number as a 64-bit float (integers too large for a float become +-inf)."""
    try:
        return float(number)
    except OverflowError:
        return math.inf if number > 0 else -math.inf


class _NoKey:
    """Marker for values with no key (lists, objects): they never match anything."""

    def __eq__(self, other: object) -> bool:
        return False


def _key(value: Any) -> Any:
    """The canonical scalar identity used for matching.

    strings by text, numbers by float value, booleans by value, null (as a list item) as null.
    Lists and objects have no key and never equal anything.
    """
    if isinstance(value, bool):
        return ("boolean", value)
    if _is_number(value):
        return ("number", _to_float(value))
    if isinstance(value, str):
        return ("string", value)
    if value is None:
        return ("null",)
    return _NoKey()


def _keys_match(a: Any, b: Any) -> bool:
    return _key(a) == _key(b)


def _key_in(value: Any, items: list) -> bool:
    """Does some item of `items` have the same key as `value`?"""
    return any(_keys_match(value, item) for item in items)


# ---------------------------------------------------------------------------------------------
# Numeric and timestamp values of a property
# ---------------------------------------------------------------------------------------------

_JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")

_TIMESTAMP = re.compile(
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})-(?P<day>[0-9]{2})"
    r"(?:"
    r"[T ](?P<hour>[0-9]{2}):(?P<minute>[0-9]{2})"
    r"(?::(?P<second>[0-9]{2})(?:\.(?P<fraction>[0-9]+))?)?"
    r"(?P<offset>Z|[+-][0-9]{2}:[0-9]{2}|[+-][0-9]{4})?"
    r")?"
)


def numeric_value(value: Any) -> float | None:
    """The numeric value of a property, or None.

    A JSON number (never a boolean), or a string that is exactly a JSON number literal
    (`"5"`, `"-2.50"`, `"1e3"`; not `"05"`, `" 7"`, `"+5"`, `"inf"`, `"1."`).
    """
    if _is_number(value):
        return _to_float(value)
    if isinstance(value, str) and _JSON_NUMBER.fullmatch(value):
        return float(value)
    return None


def _iso_timestamp(text: str) -> datetime | None:
    """Parse the ISO-8601 subset of the spec; None unless it is a real calendar date/time."""
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        return None
    parts = match.groupdict()
    fraction = parts["fraction"] or ""
    microsecond = int((fraction + "000000")[:6])  # truncate beyond microseconds
    tz = UTC
    offset = parts["offset"]
    if offset is not None and offset != "Z":
        sign = -1 if offset[0] == "-" else 1
        digits = offset[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:])
        if hours > 23 or minutes > 59:
            return None
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        moment = datetime(
            int(parts["year"]),
            int(parts["month"]),
            int(parts["day"]),
            int(parts["hour"] or 0),
            int(parts["minute"] or 0),
            int(parts["second"] or 0),
            microsecond,
            tzinfo=tz,
        )
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return None  # not a real date/time (2025-02-30, 24:00, ...) or outside years 1..9999


def _epoch_timestamp(seconds: float) -> datetime | None:
    """Unix seconds as a UTC datetime, only when it falls in years 1..9999."""
    try:
        return _UNIX_EPOCH + timedelta(seconds=seconds)
    except (OverflowError, ValueError, TypeError):
        return None


def timestamp_value(value: Any) -> datetime | None:
    """The timestamp value of a property (a UTC datetime), or None.

    A string `YYYY-MM-DD` or `YYYY-MM-DD[T ]HH:MM[:SS[.fraction]][Z|+-HH:MM|+-HHMM]` that is a real
    calendar date/time (no offset = UTC, a date alone = midnight UTC); otherwise the numeric value
    read as Unix seconds, when it falls in years 1..9999.
    """
    if isinstance(value, str):
        parsed = _iso_timestamp(value)
        if parsed is not None:
            return parsed
    seconds = numeric_value(value)
    if seconds is None:
        return None
    return _epoch_timestamp(seconds)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    # NaN, Infinity and -Infinity are not JSON, although Python's json module accepts them.
    raise ValueError(f"{name} is not JSON")


def _parse_int(text: str) -> int | float:
    # Python refuses to build ints from more than ~4300 digits; such a literal is still a number.
    try:
        return int(text)
    except ValueError:
        return float(text)


def decode_argument(argument: Any) -> tuple[Any, str | None]:
    """Return (decoded value, original text or None).

    A string argument is JSON-decoded; text that is not valid JSON stays text. A non-string
    argument is used as is and has no original text.
    """
    if not isinstance(argument, str):
        return argument, None
    try:
        decoded = json.loads(argument, parse_constant=_reject_constant, parse_int=_parse_int)
    except ValueError:  # includes json.JSONDecodeError
        decoded = argument
    return decoded, argument


def _argument_text(decoded: Any, original: str | None) -> str:
    """The argument's original text; for a non-string argument, its JSON text."""
    if original is not None:
        return original
    return json.dumps(decoded)


# --- time arguments -----------------------------------------------------------------------------

_UNITS = {
    "minute": timedelta(minutes=1),
    "minutes": timedelta(minutes=1),
    "hour": timedelta(hours=1),
    "hours": timedelta(hours=1),
    "day": timedelta(days=1),
    "days": timedelta(days=1),
    "week": timedelta(weeks=1),
    "weeks": timedelta(weeks=1),
}
_UNIT_NAMES = "|".join(_UNITS)

# "7 days ago", "30 minutes from now" (spaces) or "30_days_ago", "2_hours_from_now" (underscores).
_RELATIVE_SPACED = re.compile(rf"([0-9]+) ({_UNIT_NAMES}) (ago|from now)")
_RELATIVE_UNDERSCORED = re.compile(rf"([0-9]+)_({_UNIT_NAMES})_(ago|from_now)")

_DYNAMIC = re.compile(r"\{\{\s*recipient\.([^\s{}]+)\s*\}\}")

_MINIMUM_RELATIVE = timedelta(minutes=15)

_DIRECTIONS = {"ago": -1, "from now": 1, "from_now": 1}


def _relative_time(value: Any, unit: Any, direction: Any, now: datetime) -> datetime:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"relative time value must be a positive integer, got {value!r}")
    if not isinstance(unit, str) or unit not in _UNITS:
        raise ValueError(f"unknown relative time unit {unit!r}")
    if not isinstance(direction, str) or direction not in _DIRECTIONS:
        raise ValueError(f"unknown relative time direction {direction!r}")
    try:
        amount = value * _UNITS[unit]
        if amount < _MINIMUM_RELATIVE:
            raise ValueError(f"relative time {value} {unit} is below the 15-minute minimum")
        return now + _DIRECTIONS[direction] * amount
    except OverflowError as error:
        raise ValueError(f"relative time {value} {unit} is out of range") from error


def _time_from_decoded(decoded: Any, user: dict, now: datetime) -> datetime | None:
    """Resolve one already-decoded time argument (see `resolve_time_argument`)."""
    if isinstance(decoded, dict):
        if set(decoded) != {"value", "unit", "direction"}:
            raise ValueError(f"malformed relative time {decoded!r}")
        return _relative_time(decoded["value"], decoded["unit"], decoded["direction"], now)
    if _is_number(decoded):
        # A number is Unix seconds; outside years 1..9999 the argument is an error.
        absolute = _epoch_timestamp(decoded)
        if absolute is None:
            raise ValueError(f"{decoded!r} Unix seconds is outside years 1..9999")
        return absolute
    if not isinstance(decoded, str):
        raise ValueError(f"not a time argument: {decoded!r}")

    for pattern in (_RELATIVE_SPACED, _RELATIVE_UNDERSCORED):
        match = pattern.fullmatch(decoded)
        if match is not None:
            value, unit, direction = match.groups()
            return _relative_time(int(value), unit, direction, now)

    match = _DYNAMIC.fullmatch(decoded)
    if match is not None:
        path = match.group(1)
        _check_not_reserved(path)
        return timestamp_value(read_property(user, path))  # missing / unreadable -> None

    absolute = _iso_timestamp(decoded)
    if absolute is None:
        raise ValueError(f"not a relative, absolute or dynamic time: {decoded!r}")
    return absolute


def resolve_time_argument(argument: Any, user: dict, now: datetime) -> datetime | None:
    """Resolve a timestamp operator's argument to a UTC datetime.

    * relative: "7 days ago", "30 minutes from now", "30_days_ago", "2_hours_from_now" or
      {"value": 7, "unit": "days", "direction": "ago"}; exactly value * unit before/after `now`;
      raises ValueError when malformed or below 15 minutes;
    * absolute: an ISO-8601 string readable as a timestamp value, or a number: Unix seconds
      (integer or fractional), which must fall in years 1..9999 (else ValueError);
    * dynamic: "{{ recipient.<path> }}": the timestamp value of that property of `user`, or None
      when it has none (then the condition is false).
    Anything else raises ValueError.
    """
    decoded, _original = decode_argument(argument)
    return _time_from_decoded(decoded, user, _utc(now))


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(UTC)


# ---------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------


def _equal_to(prop: Any, decoded: Any, original: str | None) -> bool:
    if _is_scalar(decoded):
        if prop is MISSING:
            prop = _MISSING_AS_TEXT
        if _is_scalar(prop) and _keys_match(prop, decoded):
            return True
        return isinstance(prop, str) and original is not None and prop == original
    if decoded is None:
        return isinstance(prop, str) and original is not None and prop == original
    if isinstance(decoded, list):
        return (
            isinstance(prop, list)
            and len(prop) == len(decoded)
            and all(_keys_match(p, d) for p, d in zip(prop, decoded, strict=True))
        )
    return False  # an object argument


def _contains(prop: Any, decoded: Any, original: str | None) -> bool:
    if isinstance(prop, list):
        if _is_scalar(decoded):
            if _key_in(decoded, prop):
                return True
            return original is not None and any(
                isinstance(item, str) and item == original for item in prop
            )
        if isinstance(decoded, list):
            return any(_key_in(item, prop) for item in decoded)
        return False  # null or object argument
    if prop is MISSING:
        prop = _MISSING_AS_TEXT
    if _is_scalar(prop) and isinstance(decoded, list):
        return _key_in(prop, decoded)
    if isinstance(prop, str) and _is_scalar(decoded):
        return _argument_text(decoded, original) in prop
    return False  # number/boolean property with a scalar argument, objects, null argument


def _contains_all(prop: Any, decoded: Any, original: str | None) -> bool:
    if not isinstance(prop, list):
        return False
    if isinstance(decoded, list):
        return all(_key_in(item, prop) for item in decoded)
    if _is_scalar(decoded):
        return _contains(prop, decoded, original)  # a one-item list, matched like `contains`
    return False  # null or object argument


def _is_empty(prop: Any) -> bool:
    return prop is MISSING or prop == "" or prop == []


def _ordering(compare: Callable[[float, float], bool]) -> Callable[[Any, Any], bool]:
    def holds(prop: Any, decoded: Any) -> bool:
        value = numeric_value(prop)
        if value is None or not _is_number(decoded):
            return False
        return compare(value, _to_float(decoded))

    return holds


_ORDERING = {
    "greater_than": _ordering(lambda a, b: a > b),
    "greater_than_or_equal_to": _ordering(lambda a, b: a >= b),
    "less_than": _ordering(lambda a, b: a < b),
    "less_than_or_equal_to": _ordering(lambda a, b: a <= b),
}


def _is_between(prop: Any, decoded: Any) -> bool:
    if not (isinstance(decoded, list) and len(decoded) == 2 and all(map(_is_number, decoded))):
        return False
    value = numeric_value(prop)
    if value is None:
        return False
    low, high = _to_float(decoded[0]), _to_float(decoded[1])
    return low <= value <= high


_TIMESTAMP_VS_ARGUMENT = {
    "is_timestamp_before": lambda t, arg: t < arg,
    "is_timestamp_before_date": lambda t, arg: t < arg,
    "is_timestamp_on_or_after": lambda t, arg: t >= arg,
    "is_timestamp_on_or_after_date": lambda t, arg: t >= arg,
}

_TIMESTAMP_VS_NOW = {
    "is_timestamp_before_now": lambda t, now: t < now,
    "is_timestamp_on_or_after_now": lambda t, now: t >= now,
}


def _random_cohort(user: dict, decoded: Any) -> bool:
    if not _is_number(decoded):
        raise ValueError(f"is_in_random_cohort needs a percentage, got {decoded!r}")
    user_id = user.get("id")
    if not isinstance(user_id, str):
        raise ValueError("is_in_random_cohort needs a user with a string id")
    bucket = int(hashlib.md5(user_id.encode()).hexdigest()[:8], 16) % 100
    return bucket < _to_float(decoded)


def _audience_member(
    user: dict, argument: Any, is_member: Callable[[str, str], bool] | None
) -> bool:
    if is_member is None:
        raise ValueError("audience membership conditions need an is_member callback")
    if not isinstance(argument, str) or argument == "":
        raise ValueError(f"audience membership needs an audience key, got {argument!r}")
    return bool(is_member(argument, user.get("id")))


_PAIR_SCOPES = ("tenant", "membership")


def evaluate_condition(
    condition: dict,
    user: dict,
    *,
    now: datetime,
    is_member: Callable[[str, str], bool] | None = None,
    events: list[dict] | None = None,
    tenant: dict | None = None,
    membership: dict | None = None,
) -> bool:
    """Evaluate one condition `{"property"|"variable", "operator", "argument"}` for `user`.

    `events` are every tracked event in arrival order (Segment's track shape: `userId`, `event`,
    `timestamp`, `messageId`, `properties`), which the event operators read the user's ones from.

    Per-tenant audiences evaluate a (user, tenant) pair: `tenant` is the tenant (its `id` and
    properties) and `membership` the properties of the user's membership of it. A property
    `tenant.<path>` or `membership.<path>` reads those by the same rules as the user's; without a
    pair it is an error.
    """
    now = _utc(now)
    path = condition.get("property", condition.get("variable"))
    if not isinstance(path, str):
        raise ValueError(f"condition has no property: {condition!r}")
    operator = condition.get("operator")
    argument = condition.get("argument")
    if not _valid_unicode(path) or not _valid_unicode(argument):
        raise ValueError("a property or argument with a lone surrogate is not valid Unicode text")
    scope, inner = path.split(".", 1) if "." in path else ("recipient", path)
    subject = user
    if scope in _PAIR_SCOPES:
        if tenant is None:
            raise ValueError(f"{path!r} reads the {scope}: the audience is not per tenant")
        if operator in (*_EVENT_OPERATORS, "is_audience_member", "is_not_audience_member"):
            raise ValueError(f"{operator} applies to the recipient, not {path!r}")
        if operator == "is_in_random_cohort":
            raise ValueError(f"is_in_random_cohort applies to recipient.id, not {path!r}")
        subject = tenant if scope == "tenant" else (membership or {})
        path = inner
    if operator in _EVENT_OPERATORS:
        return _event_condition(operator, argument, user, now, events or [])
    _check_not_reserved(path)
    decoded, original = decode_argument(argument)

    # Operators that do not read the property.
    if operator in ("is_audience_member", "is_not_audience_member"):
        member = _audience_member(user, argument, is_member)
        return member if operator == "is_audience_member" else not member
    if operator == "is_in_random_cohort":
        return _random_cohort(user, decoded)

    prop = read_property(subject, path)

    if operator == "equal_to":
        return _equal_to(prop, decoded, original)
    if operator == "not_equal_to":
        return not _equal_to(prop, decoded, original)
    if operator in _ORDERING:
        return _ORDERING[operator](prop, decoded)
    if operator == "is_between":
        return _is_between(prop, decoded)
    if operator == "contains":
        return _contains(prop, decoded, original)
    if operator == "not_contains":
        return not _contains(prop, decoded, original)
    if operator == "contains_all":
        return _contains_all(prop, decoded, original)
    if operator == "not_contains_all":
        return not _contains_all(prop, decoded, original)
    if operator == "empty":
        return _is_empty(prop)
    if operator == "not_empty":
        return not _is_empty(prop)
    if operator == "exists":
        return prop is not MISSING
    if operator == "not_exists":
        return prop is MISSING
    if operator in _TIMESTAMP_VS_ARGUMENT:
        bound = _time_from_decoded(decoded, user, now)  # resolved first: a bad argument raises
        t = timestamp_value(prop)
        if t is None or bound is None:
            return False
        return _TIMESTAMP_VS_ARGUMENT[operator](t, bound)
    if operator == "is_timestamp_between":
        if not (isinstance(decoded, list) and len(decoded) == 2):
            raise ValueError(f"is_timestamp_between needs [start, end], got {argument!r}")
        start = _time_from_decoded(decoded[0], user, now)
        end = _time_from_decoded(decoded[1], user, now)
        t = timestamp_value(prop)
        if t is None or start is None or end is None:
            return False
        return start <= t <= end
    if operator in _TIMESTAMP_VS_NOW:
        t = timestamp_value(prop)
        return t is not None and _TIMESTAMP_VS_NOW[operator](t, now)
    if operator == "is_timestamp":
        return timestamp_value(prop) is not None
    if operator == "is_not_timestamp":
        return timestamp_value(prop) is None
    raise ValueError(f"unknown operator {operator!r}")


def evaluate_audience(
    audience: dict,
    user: dict,
    *,
    now: datetime,
    is_member: Callable[[str, str], bool] | None = None,
    events: list[dict] | None = None,
    tenant: dict | None = None,
    membership: dict | None = None,
) -> bool:
    """Does `user` match `audience`? Segments are ORed, a segment's conditions are ANDed.

    No segments, or a segment with no conditions, matches nobody. Every condition is evaluated
    (no short-circuit) so that an invalid definition always raises ValueError. For a per-tenant
    audience, call it once per (user, tenant) pair with `tenant` and `membership` (see
    `evaluate_pairs`).
    """
    matched = False
    for segment in audience.get("segments") or []:
        conditions = segment.get("conditions") or []
        results = [
            evaluate_condition(
                condition,
                user,
                now=now,
                is_member=is_member,
                events=events,
                tenant=tenant,
                membership=membership,
            )
            for condition in conditions
        ]
        if results and all(results):
            matched = True
    return matched


def evaluate_pairs(
    audience: dict,
    users: list[dict],
    tenants: list[dict],
    memberships: list[dict],
    *,
    now: datetime,
    is_member: Callable[[str, str, str | None], bool] | None = None,
    audiences: dict[str, dict] | None = None,
) -> set[tuple[str, str]]:
    """The (user id, tenant id) members of a per-tenant audience: each membership (`user_id`,
    `tenant_id`, and its properties) whose user and tenant both exist is one pair, evaluated with
    `tenant.*` reading the tenant and `membership.*` the membership's properties. A membership
    naming a missing user or tenant is no pair.

    `is_audience_member X` in the pair (user, T): `is_member(X, user id, tenant or None)` tells
    whether X holds that exact membership row, and `audiences` (definitions by key; a key absent
    is a hand-written SQL audience) X's kind. A dynamic X without `"tenancy": "per_tenant"` has
    members with no tenant, read as (user, None): a condition on the user holds in each of the
    user's tenants. Any other X (per-tenant, static, SQL) is read tenant-strict: (user, T)."""
    by_user = {user["id"]: user for user in users}
    by_tenant = {tenant["id"]: tenant for tenant in tenants}
    known = audiences or {}

    def tenantless(key: str) -> bool:
        found = known.get(key)
        return (
            found is not None
            and found.get("type") == "dynamic"
            and found.get("tenancy") != "per_tenant"
        )

    members = set()
    for membership in memberships:
        user = by_user.get(membership["user_id"])
        tenant = by_tenant.get(membership["tenant_id"])
        if user is None or tenant is None:
            continue
        properties = {
            name: value
            for name, value in membership.items()
            if name not in ("user_id", "tenant_id")
        }
        pair_member = None
        if is_member is not None:

            def pair_member(key: str, user_id: str, tenant_id: str = tenant["id"]) -> bool:
                return is_member(key, user_id, None if tenantless(key) else tenant_id)

        if evaluate_audience(
            audience,
            user,
            now=now,
            is_member=pair_member,
            tenant=tenant,
            membership=properties,
        ):
            members.add((user["id"], tenant["id"]))
    return members


# ---------------------------------------------------------------------------------------------
# Event conditions (our extension): performed, last_performed_before, last_performed_after
# ---------------------------------------------------------------------------------------------

_EVENT_OPERATORS = ("performed", "last_performed_before", "last_performed_after")
_EVENT_ARGUMENT_KEYS = {
    "performed": {"event", "count", "within", "where"},
    "last_performed_before": {"event", "time", "where"},
    "last_performed_after": {"event", "time", "where"},
}
_WITHIN = re.compile(rf"([0-9]+)[ _]({_UNIT_NAMES})(?:[ _]ago)?")


def _whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _event_time(event: dict) -> datetime | None:
    """An event's time: its `timestamp`, an ISO-8601 text (a loader quarantines any other)."""
    stamp = event.get("timestamp")
    return _iso_timestamp(stamp) if isinstance(stamp, str) else None


def _usable(event: dict) -> bool:
    """An event a loader keeps: a user id, an event name and a message id (non-empty strings),
    a readable timestamp, and properties that are an object (or none). Any other row is
    quarantined and never counts."""
    properties = event.get("properties")
    return (
        all(
            isinstance(event.get(key), str) and event[key] != ""
            for key in ("userId", "event", "messageId")
        )
        and _event_time(event) is not None
        and (properties is None or isinstance(properties, dict))
    )


def _distinct_events(events: list[dict], user_id: Any) -> list[dict]:
    """The user's events. Events are append-only: a messageId seen before (for any user) is the
    same event, counted once as it first arrived."""
    seen: set[str] = set()
    kept = []
    for event in events:
        if not _usable(event):
            continue
        message_id = event["messageId"]
        if message_id in seen:
            continue
        seen.add(message_id)
        if event["userId"] == user_id:
            kept.append(event)
    return kept


def _within_bounds(
    within: Any, user: dict, now: datetime
) -> tuple[datetime | None, datetime | None]:
    """The (exclusive) lower and upper bounds on the event's time that `within` sets."""
    if within is None:
        return None, None
    if isinstance(within, str):
        match = _WITHIN.fullmatch(within)
        if match is None:
            raise ValueError(f"within is not a duration: {within!r}")
        return _relative_time(int(match.group(1)), match.group(2), "ago", now), None
    if isinstance(within, dict) and "value" in within:
        if (
            not set(within) <= {"value", "unit", "direction"}
            or within.get("direction", "ago") != "ago"
        ):
            raise ValueError(f"malformed within duration {within!r}")
        return _relative_time(within["value"], within.get("unit"), "ago", now), None
    if isinstance(within, dict) and within and set(within) <= {"after", "before"}:
        after = (
            _time_from_decoded(decode_argument(within["after"])[0], user, now)
            if "after" in within
            else None
        )
        before = (
            _time_from_decoded(decode_argument(within["before"])[0], user, now)
            if "before" in within
            else None
        )
        if ("after" in within and after is None) or ("before" in within and before is None):
            return _NOTHING, _NOTHING  # a dynamic bound the user does not have: nothing counts
        return after, before
    raise ValueError(f"within is not a duration or bounds: {within!r}")


_NOTHING = datetime.max.replace(tzinfo=UTC)


def _event_condition(
    operator: str, argument: Any, user: dict, now: datetime, events: list[dict]
) -> bool:
    """Evaluate an event condition over the user's events (see docs/conditions.md)."""
    spec = decode_argument(argument)[0] if isinstance(argument, str) else argument
    if not isinstance(spec, dict) or not set(spec) <= _EVENT_ARGUMENT_KEYS[operator]:
        raise ValueError(f"malformed {operator} argument {argument!r}")
    name = spec.get("event")
    if not isinstance(name, str) or name == "":
        raise ValueError(f"{operator} needs an event name, got {name!r}")
    where = spec.get("where") or []
    if not isinstance(where, list):
        raise ValueError(f"where must be a list, got {where!r}")
    for filter_condition in where:
        path = (
            filter_condition.get("property", filter_condition.get("variable"))
            if isinstance(filter_condition, dict)
            else None
        )
        if not isinstance(path, str) or not path.startswith("data.") or path == "data.":
            raise ValueError(f"a where condition reads data.<property>, got {filter_condition!r}")
        if filter_condition.get("operator") in (
            "is_audience_member",
            "is_not_audience_member",
            "is_in_random_cohort",
            *_EVENT_OPERATORS,
        ):
            raise ValueError(f"{filter_condition.get('operator')} cannot filter events")

    def qualifies(event: dict) -> bool:
        """The event's name is exactly `name`, it happened by now, and every `where` holds over
        its properties (read as `data.<path>`)."""
        moment = _event_time(event)
        if event.get("event") != name or moment is None or moment > now:
            return False
        properties = event.get("properties")
        document = {"data": properties if isinstance(properties, dict) else {}}
        results = [evaluate_condition(c, document, now=now) for c in where]
        return all(results)

    if operator == "performed":
        count = spec.get("count")
        if not (isinstance(count, dict) and len(count) == 1):
            raise ValueError(f"performed needs a count, got {count!r}")
        ((kind, number),) = count.items()
        if (
            kind not in ("at_least", "at_most", "exactly")
            or not _whole_number(number)
            or number < 0
        ):
            raise ValueError(f"malformed count {count!r}")
        after, before = _within_bounds(spec.get("within"), user, now)
        counted = 0
        for event in _distinct_events(events, user.get("id")):
            if not qualifies(event):
                continue
            moment = _event_time(event)
            if after is not None and not moment > after:
                continue
            if before is not None and not moment < before:
                continue
            counted += 1
        if kind == "at_least":
            return counted >= number
        if kind == "at_most":
            return counted <= number
        return counted == number

    if "time" not in spec:
        raise ValueError(f"{operator} needs a time")
    bound = _time_from_decoded(decode_argument(spec["time"])[0], user, now)
    times = [
        _event_time(event) for event in _distinct_events(events, user.get("id")) if qualifies(event)
    ]
    if not times or bound is None:
        return False  # never performed (or no bound): neither operator matches
    last = max(times)
    return last < bound if operator == "last_performed_before" else last >= bound
