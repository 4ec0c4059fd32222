"""Reading condition arguments the way Knock does: JSON-decoded values and time expressions.

Validation and the compiler both parse arguments through these functions, so a definition that
validates is a definition that compiles. The rules are in docs/conditions.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

MINIMUM_RELATIVE = timedelta(minutes=15)

# A string property counts as a number only when it is exactly a JSON number literal.
NUMBER_PATTERN = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"
# ISO 8601 / RFC 3339 dates and date-times; no offset means UTC.
TIMESTAMP_PATTERN = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"([T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]+)?)?(Z|[+-][0-9]{2}:?[0-9]{2})?)?"
)
# Unix seconds inside years 1..9999, the range both Python and SQL engines can represent.
EPOCH_RANGE = (-62135596800.0, 253402300799.0)

_UNITS = {"minute": 1, "hour": 60, "day": 60 * 24, "week": 60 * 24 * 7}
_RELATIVE_TEXT = re.compile(
    r"^\s*(?P<value>[0-9]+)[\s_]+(?P<unit>minutes?|hours?|days?|weeks?)[\s_]+"
    r"(?P<direction>ago|from[\s_]+now)\s*$"
)
_DYNAMIC = re.compile(r"^\s*\{\{\s*(?P<path>[^{}]+?)\s*\}\}\s*$")


class ArgumentError(ValueError):
    """An argument an operator cannot use; the message says what was expected."""


@dataclass(frozen=True)
class Argument:
    """A static argument: its JSON-decoded value and the text it was written as (if a string)."""

    value: object
    original_text: str | None

    @property
    def text(self) -> str:
        """The text used for substring tests: the original text, or the JSON of a non-string."""
        if self.original_text is not None:
            return self.original_text
        return json.dumps(self.value, ensure_ascii=False)


def decode_argument(raw: object) -> Argument:
    """JSON-decode a string argument (`"5"` -> 5); text that is not JSON stays text.

    >>> decode_argument("5")
    Argument(value=5, original_text='5')
    >>> decode_argument("premium")
    Argument(value='premium', original_text='premium')
    """
    if isinstance(raw, str):
        try:
            return Argument(json_decode(raw), raw)
        except ValueError:
            return Argument(raw, raw)
    return Argument(raw, None)


def json_decode(text: str) -> object:
    """Strict JSON: `NaN` and `Infinity` are not JSON (they stay text), and an integer too long
    for Python's int parser is still a number (a float)."""
    return json.loads(text, parse_constant=_not_json, parse_int=_integer)


def _not_json(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _integer(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RelativeTime:
    """`minutes` before (negative) or after (positive) the evaluation time."""

    minutes: int

    def resolve(self, now: datetime) -> datetime:
        return now + timedelta(minutes=self.minutes)


@dataclass(frozen=True)
class DynamicTime:
    """The timestamp held in another property of the same user, `{{ recipient.path }}`."""

    path: tuple[str, ...]


TimeArgument = datetime | RelativeTime | DynamicTime


def parse_time_argument(raw: object) -> TimeArgument:
    """Parse a relative (`"7 days ago"`), absolute (ISO 8601) or dynamic (`{{ recipient.x }}`) time."""
    if isinstance(raw, dict):
        return _relative_from_object(raw)
    if not isinstance(raw, str):
        raise ArgumentError(f"expected a time (e.g. \"7 days ago\" or an ISO 8601 date), got {raw!r}")
    dynamic = _DYNAMIC.match(raw)
    if dynamic:
        return DynamicTime(parse_property_path(dynamic.group("path")))
    relative = _RELATIVE_TEXT.match(raw.lower())
    if relative:
        return _relative(int(relative.group("value")), relative.group("unit"), relative.group("direction"))
    try:
        decoded = json.loads(raw)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        return _relative_from_object(decoded)
    absolute = parse_timestamp_text(raw)
    if absolute is None:
        raise ArgumentError(
            f"{raw!r} is not a time: use a relative time (\"7 days ago\", \"30 minutes from now\"), "
            "an ISO 8601 timestamp or {{ recipient.<property> }}"
        )
    return absolute


def _relative_from_object(raw: dict) -> RelativeTime:
    value, unit, direction = raw.get("value"), raw.get("unit"), raw.get("direction")
    if not (isinstance(value, int) and not isinstance(value, bool)) or not isinstance(unit, str):
        raise ArgumentError(f"a relative time object needs an integer value and a unit, got {raw!r}")
    if direction not in ("ago", "from_now", "from now"):
        raise ArgumentError(f"a relative time direction is \"ago\" or \"from_now\", got {direction!r}")
    return _relative(value, unit.lower(), direction)


def _relative(value: int, unit: str, direction: str) -> RelativeTime:
    base = unit.rstrip("s")
    if base not in _UNITS:
        raise ArgumentError(f"unknown time unit {unit!r}: use minutes, hours, days or weeks")
    minutes = value * _UNITS[base]
    if timedelta(minutes=minutes) < MINIMUM_RELATIVE:
        raise ArgumentError(f"relative times must be at least 15 minutes, got {value} {unit}")
    return RelativeTime(-minutes if direction == "ago" else minutes)


def parse_timestamp_text(text: str) -> datetime | None:
    """Read an ISO 8601 / RFC 3339 timestamp; no offset means UTC, a date alone is midnight UTC."""
    if not re.fullmatch(TIMESTAMP_PATTERN, text):
        return None
    normalized = text.replace("Z", "+00:00")
    fraction = re.search(r"\.([0-9]+)", normalized)
    if fraction and len(fraction.group(1)) > 6:
        normalized = normalized.replace(fraction.group(0), "." + fraction.group(1)[:6], 1)
    try:
        parsed = datetime.fromisoformat(normalized)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def parse_property_path(text: str) -> tuple[str, ...]:
    """`recipient.address.city` -> ("address", "city"); the `recipient.` prefix is optional."""
    if not isinstance(text, str) or text == "":
        raise ArgumentError(f"a property must be a non-empty string, got {text!r}")
    parts = tuple(text.split("."))
    if parts[0] == "recipient" and len(parts) > 1:
        parts = parts[1:]
    return parts
