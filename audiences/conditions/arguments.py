"""Reading condition arguments the way Knock does: JSON-decoded values and time expressions.

Validation and the compiler both parse arguments through these functions, so a definition that
validates is a definition that compiles. The rules are in docs/conditions.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

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
UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_UNITS = {"minute": 1, "hour": 60, "day": 60 * 24, "week": 60 * 24 * 7}
_UNIT_NAMES = "minutes?|hours?|days?|weeks?"
# Exactly the documented forms: "7 days ago", "30 minutes from now", "30_days_ago", "2_hours_from_now".
_RELATIVE_TEXT = (
    re.compile(rf"(?P<value>[0-9]+) (?P<unit>{_UNIT_NAMES}) (?P<direction>ago|from now)"),
    re.compile(rf"(?P<value>[0-9]+)_(?P<unit>{_UNIT_NAMES})_(?P<direction>ago|from_now)"),
)
_DYNAMIC = re.compile(r"\{\{\s*(?P<path>recipient\.[^\s{}]+)\s*\}\}")
# A relative time reaches at most across years 1..9999.
_LONGEST_RELATIVE = datetime.max - datetime.min


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
    """Parse a timestamp operator's argument, JSON-decoded first like every argument.

    Relative (`"7 days ago"`, `{"value": 7, "unit": "days", "direction": "ago"}`), absolute
    (an ISO 8601 string, or a number: Unix seconds) or dynamic (`{{ recipient.x }}`).
    """
    return time_from_decoded(decode_argument(raw).value)


def time_from_decoded(value: object) -> TimeArgument:
    """Parse one already-decoded time: also each bound of `is_timestamp_between`'s `[start, end]`."""
    if isinstance(value, dict):
        return _relative_from_object(value)
    if is_number(value):
        return epoch_seconds(value)
    if not isinstance(value, str):
        raise ArgumentError(
            f'{value!r} is not a time: use a relative time ("7 days ago"), '
            "an ISO 8601 timestamp, Unix seconds or {{ recipient.<property> }}"
        )
    dynamic = _DYNAMIC.fullmatch(value)
    if dynamic:
        return DynamicTime(parse_property_path(dynamic.group("path")))
    for pattern in _RELATIVE_TEXT:
        relative = pattern.fullmatch(value)
        if relative:
            return _relative(
                int(relative.group("value")), relative.group("unit"), relative.group("direction")
            )
    absolute = parse_timestamp_text(value)
    if absolute is None:
        raise ArgumentError(
            f'{value!r} is not a time: use a relative time ("7 days ago", "30 minutes from now"), '
            "an ISO 8601 timestamp, Unix seconds or {{ recipient.<property> }}"
        )
    return absolute


def epoch_seconds(seconds: int | float) -> datetime:
    """Unix seconds (integer or fractional) as a UTC datetime, to the microsecond; only in years 1..9999."""
    try:
        if seconds != seconds:
            raise OverflowError
        return UNIX_EPOCH + timedelta(seconds=seconds)
    except (OverflowError, ValueError):
        raise ArgumentError(
            f"{seconds!r} is not a time in years 1..9999 when read as Unix seconds "
            f"(from {EPOCH_RANGE[0]:.0f} to {EPOCH_RANGE[1]:.0f})"
        ) from None


def _relative_from_object(raw: dict) -> RelativeTime:
    if set(raw) != {"value", "unit", "direction"}:
        raise ArgumentError(
            f'a relative time object is {{"value", "unit", "direction"}}, got {raw!r}'
        )
    value, unit, direction = raw["value"], raw["unit"], raw["direction"]
    if not (isinstance(value, int) and not isinstance(value, bool)):
        raise ArgumentError(f"a relative time's value is a positive integer, got {value!r}")
    if not isinstance(unit, str) or not re.fullmatch(_UNIT_NAMES, unit):
        raise ArgumentError(f"unknown time unit {unit!r}: use minutes, hours, days or weeks")
    if direction not in ("ago", "from_now", "from now"):
        raise ArgumentError(f'a relative time direction is "ago" or "from_now", got {direction!r}')
    return _relative(value, unit, direction)


def _relative(value: int, unit: str, direction: str) -> RelativeTime:
    minutes = value * _UNITS[unit.removesuffix("s")]
    if minutes * 60 < MINIMUM_RELATIVE.total_seconds():
        raise ArgumentError(f"relative times must be at least 15 minutes, got {value} {unit}")
    if minutes * 60 > _LONGEST_RELATIVE.total_seconds():
        raise ArgumentError(f"relative time {value} {unit} reaches beyond years 1..9999")
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
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_property_path(text: str) -> tuple[str, ...]:
    """`recipient.address.city` -> ("address", "city"); the `recipient.` prefix is optional."""
    if not isinstance(text, str) or text == "":
        raise ArgumentError(f"a property must be a non-empty string, got {text!r}")
    parts = tuple(text.split("."))
    if "" in parts:  # `a..b`, `recipient.`: they read a property named "", which no one has
        raise ArgumentError(
            f"{text!r} has an empty part: a property path is names joined by single dots"
        )
    if parts[0] == "recipient" and len(parts) > 1:
        parts = parts[1:]
    return parts
