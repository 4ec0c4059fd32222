"""Pins the reference evaluator (audiences/conditions/reference.py) to docs/conditions.md.

Each test holds one rule of the spec with concrete inputs and expected outputs, so that the
reference can be trusted as the oracle for the property-based comparison with the SQL compiler.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone

import pytest

from audiences.conditions.reference import (
    MISSING,
    decode_argument,
    evaluate_audience,
    evaluate_condition,
    numeric_value,
    read_property,
    resolve_time_argument,
    timestamp_value,
)

UTC = UTC
NOW = datetime(2025, 6, 15, 12, 0, 0, tzinfo=UTC)
_ABSENT = object()


def check(value, operator, argument=_ABSENT, *, prop="recipient.p", user=None, is_member=None):
    """Evaluate one condition against a user whose property `p` is `value` (or absent)."""
    if user is None:
        user = {"id": "user-1"}
        if value is not _ABSENT:
            user["p"] = value
    condition = {"property": prop, "operator": operator}
    if argument is not _ABSENT:
        condition["argument"] = argument
    return evaluate_condition(condition, user, now=NOW, is_member=is_member)


# --------------------------------------------------------------------------------------------
# Audience shape
# --------------------------------------------------------------------------------------------

PLAN_PRO = {"property": "recipient.plan", "operator": "equal_to", "argument": "pro"}
COUNTRY_FR = {"property": "recipient.country", "operator": "equal_to", "argument": "FR"}
PRO_FR_USER = {"id": "u1", "plan": "pro", "country": "FR"}
PRO_US_USER = {"id": "u2", "plan": "pro", "country": "US"}
FREE_US_USER = {"id": "u3", "plan": "free", "country": "US"}


def test_audience_with_no_segments_matches_nobody():
    assert evaluate_audience({"segments": []}, PRO_FR_USER, now=NOW) is False
    assert evaluate_audience({"name": "x", "type": "dynamic"}, PRO_FR_USER, now=NOW) is False


def test_segment_with_no_conditions_matches_nobody():
    audience = {"segments": [{"conditions": []}]}
    assert evaluate_audience(audience, PRO_FR_USER, now=NOW) is False


def test_empty_segment_does_not_stop_another_segment_matching():
    audience = {"segments": [{"conditions": []}, {"conditions": [PLAN_PRO]}]}
    assert evaluate_audience(audience, PRO_FR_USER, now=NOW) is True


@pytest.mark.parametrize(
    ("user", "expected"), [(PRO_FR_USER, True), (PRO_US_USER, False), (FREE_US_USER, False)]
)
def test_conditions_in_a_segment_are_anded(user, expected):
    audience = {"segments": [{"conditions": [PLAN_PRO, COUNTRY_FR]}]}
    assert evaluate_audience(audience, user, now=NOW) is expected


@pytest.mark.parametrize(
    ("user", "expected"), [(PRO_FR_USER, True), (PRO_US_USER, True), (FREE_US_USER, False)]
)
def test_segments_are_ored(user, expected):
    audience = {"segments": [{"conditions": [PLAN_PRO]}, {"conditions": [COUNTRY_FR]}]}
    assert evaluate_audience(audience, user, now=NOW) is expected


def test_invalid_condition_raises_even_when_an_earlier_condition_is_false():
    bad = {"property": "recipient.plan", "operator": "no_such_operator", "argument": "x"}
    audience = {"segments": [{"conditions": [PLAN_PRO, bad]}]}
    with pytest.raises(ValueError):
        evaluate_audience(audience, FREE_US_USER, now=NOW)


def test_unknown_operator_raises():
    with pytest.raises(ValueError, match="unknown operator"):
        check("x", "equals", "x")


def test_condition_without_property_raises():
    with pytest.raises(ValueError):
        evaluate_condition({"operator": "exists"}, {"id": "u"}, now=NOW)


def test_variable_is_a_synonym_of_property():
    condition = {"variable": "recipient.plan", "operator": "equal_to", "argument": "pro"}
    assert evaluate_condition(condition, PRO_FR_USER, now=NOW) is True
    assert evaluate_condition(condition, FREE_US_USER, now=NOW) is False


@pytest.mark.parametrize("prop", ["created_at", "recipient.created_at", "recipient.updated_at"])
def test_reserved_created_at_and_updated_at_cannot_be_used(prop):
    user = {"id": "u", "created_at": "2025-01-01", "updated_at": "2025-01-01"}
    with pytest.raises(ValueError, match="cannot be used"):
        evaluate_condition({"property": prop, "operator": "exists"}, user, now=NOW)


def test_naive_now_is_rejected():
    with pytest.raises(ValueError, match="timezone-aware"):
        evaluate_condition(
            {"property": "p", "operator": "exists"}, {"id": "u"}, now=datetime(2025, 1, 1)
        )


# --------------------------------------------------------------------------------------------
# Reading properties
# --------------------------------------------------------------------------------------------

NESTED_USER = {
    "id": "user-42",
    "name": "Zoë",
    "address": {"city": "Paris", "geo": {"lat": 48.85}, "zip": None},
    "nothing": None,
    "title": "plain string",
    "tags": ["a", None],
    "empty_text": "",
    'a"; drop table users; --': "hostile",
    "ünï": {"cödé": "✓"},
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("recipient.name", "Zoë"),
        ("name", "Zoë"),
        ("recipient.address.city", "Paris"),
        ("address.geo.lat", 48.85),
        ("recipient.address", {"city": "Paris", "geo": {"lat": 48.85}, "zip": None}),
        ("recipient.tags", ["a", None]),
        ("recipient.empty_text", ""),
        ('recipient.a"; drop table users; --', "hostile"),
        ("recipient.ünï.cödé", "✓"),
    ],
)
def test_read_property_follows_the_dotted_path(path, expected):
    assert read_property(NESTED_USER, path) == expected


@pytest.mark.parametrize("path", ["recipient.id", "id"])
def test_recipient_id_is_the_user_id(path):
    assert read_property(NESTED_USER, path) == "user-42"


@pytest.mark.parametrize(
    "path",
    [
        "recipient.unknown",
        "recipient.nothing",  # null is missing
        "recipient.address.zip",  # nested null is missing
        "recipient.nothing.deeper",  # through null
        "recipient.unknown.deeper",  # through missing
        "recipient.title.length",  # through a string
        "recipient.address.geo.lat.x",  # through a number
        "recipient.tags.0",  # through a list
        "recipient.id.x",  # through the id string
        "recipient.Name",  # paths are case-sensitive
    ],
)
def test_read_property_is_missing_for_absent_null_or_unreachable_values(path):
    assert read_property(NESTED_USER, path) is MISSING


def test_recipient_prefix_is_stripped_only_once():
    user = {"id": "u", "recipient": {"plan": "pro"}}
    assert read_property(user, "recipient.recipient.plan") == "pro"
    assert read_property(user, "recipient.plan") is MISSING


def test_null_inside_a_list_is_a_list_item():
    assert read_property(NESTED_USER, "tags") == ["a", None]
    assert check(["a", None], "contains", "[null]") is True
    assert check(["a", None], "exists") is True


def test_hostile_property_name_is_just_a_key():
    user = {"id": "u", 'a"; drop table users; --': "x';--"}
    prop = 'recipient.a"; drop table users; --'
    assert check(None, "equal_to", "x';--", prop=prop, user=user) is True
    assert check(None, "contains", "';", prop=prop, user=user) is True
    assert check(None, "exists", prop='recipient.a"; drop table', user=user) is False


def test_unicode_values_compare_by_text():
    assert check("Zoë", "equal_to", "Zoë") is True
    assert check("Zoë", "equal_to", "Zoe") is False
    assert check("日本語テキスト", "contains", "語テ") is True
    assert check(["✓", "é"], "contains", "é") is True


# --------------------------------------------------------------------------------------------
# Numeric values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, 5.0),
        (5.5, 5.5),
        (-3, -3.0),
        ("5", 5.0),
        ("-2.50", -2.5),
        ("1e3", 1000.0),
        ("0", 0.0),
        ("-0.5E-2", -0.005),
        ("05", None),
        (" 7", None),
        ("7 ", None),
        ("7\n", None),
        ("+5", None),
        ("inf", None),
        ("NaN", None),
        ("1.", None),
        (".5", None),
        ("1,5", None),
        ("", None),
        ("٥", None),  # Arabic-Indic digit five: not a JSON digit
        (True, None),
        (False, None),
        ([1], None),
        ({"a": 1}, None),
        (MISSING, None),
    ],
)
def test_numeric_value_is_a_number_or_an_exact_json_number_literal(value, expected):
    assert numeric_value(value) == expected


def test_numeric_value_of_huge_integer_is_a_64_bit_float():
    assert numeric_value(2**53 + 1) == float(2**53)
    assert numeric_value(10**400) == float("inf")


# --------------------------------------------------------------------------------------------
# Timestamp values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-06-15", datetime(2025, 6, 15, tzinfo=UTC)),
        ("2025-06-15T14:30", datetime(2025, 6, 15, 14, 30, tzinfo=UTC)),
        ("2025-06-15 14:30", datetime(2025, 6, 15, 14, 30, tzinfo=UTC)),
        ("2025-06-15T14:30:05Z", datetime(2025, 6, 15, 14, 30, 5, tzinfo=UTC)),
        ("2025-06-15T14:30:05.5Z", datetime(2025, 6, 15, 14, 30, 5, 500000, tzinfo=UTC)),
        ("2025-06-15T14:30:05.123456789", datetime(2025, 6, 15, 14, 30, 5, 123456, tzinfo=UTC)),
        ("2025-06-15T14:30:00+02:00", datetime(2025, 6, 15, 12, 30, tzinfo=UTC)),
        ("2025-06-15T14:30:00-0530", datetime(2025, 6, 15, 20, 0, tzinfo=UTC)),
        ("2025-06-15T00:30+01:00", datetime(2025, 6, 14, 23, 30, tzinfo=UTC)),
        ("2024-02-29", datetime(2024, 2, 29, tzinfo=UTC)),
        ("0001-01-01", datetime(1, 1, 1, tzinfo=UTC)),
        ("9999-12-31T23:59:59", datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
        # numbers and numeric strings are Unix seconds
        (0, datetime(1970, 1, 1, tzinfo=UTC)),
        (1750000000, datetime(2025, 6, 15, 15, 6, 40, tzinfo=UTC)),
        ("1750000000", datetime(2025, 6, 15, 15, 6, 40, tzinfo=UTC)),
        (1.5, datetime(1970, 1, 1, 0, 0, 1, 500000, tzinfo=UTC)),
        (-86400, datetime(1969, 12, 31, tzinfo=UTC)),
        ("2025", datetime(1970, 1, 1, 0, 33, 45, tzinfo=UTC)),
    ],
)
def test_timestamp_value_reads_iso_strings_and_unix_seconds(value, expected):
    assert timestamp_value(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "2025-02-30",  # not a real date
        "2025-02-29",  # not a leap year
        "2025-13-01",
        "0000-01-01",  # year 0
        "2025-06-15T24:00",
        "2025-06-15T12:60",
        "2025-06-15T12:00:60",  # no leap seconds
        "2025-06-15t12:00Z",  # lower-case t
        "2025-06-15T12:00z",  # lower-case z
        "2025-06-15T12",  # minutes required
        "2025-06-15T12:00:00.",  # fraction needs digits
        "2025-06-15T12:00.5",  # fraction needs seconds
        "2025-06-15T12:00+2",
        "2025-06-15T12:00+24:00",
        "2025-06-15T12:00+01:60",
        "2025-6-15",
        " 2025-06-15",
        "2025-06-15\n",
        "15/06/2025",
        "June 15, 2025",
        "",
        "now",
        "0001-01-01T00:00+01:00",  # before year 1 in UTC
        "1e20",  # Unix seconds far beyond year 9999
        -1e12,
        10**30,
        "1e400",
        True,
        False,
        ["2025-06-15"],
        {"at": "2025-06-15"},
        MISSING,
    ],
)
def test_timestamp_value_is_none_for_anything_else(value):
    assert timestamp_value(value) is None


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("5", (5, "5")),
        ("5.0", (5.0, "5.0")),
        ("true", (True, "true")),
        ("null", (None, "null")),
        ('["a","b"]', (["a", "b"], '["a","b"]')),
        ('{"a": 1}', ({"a": 1}, '{"a": 1}')),
        ('"quoted"', ("quoted", '"quoted"')),
        (" 7", (7, " 7")),  # JSON allows surrounding whitespace
        ("premium", ("premium", "premium")),
        ("", ("", "")),
        ("05", ("05", "05")),  # not JSON: stays text
        ("NaN", ("NaN", "NaN")),  # not JSON, although Python's json accepts it
        ("Infinity", ("Infinity", "Infinity")),
        ("[1,", ("[1,", "[1,")),
        ("True", ("True", "True")),
        (5, (5, None)),
        (True, (True, None)),
        (None, (None, None)),
        (["a"], (["a"], None)),
    ],
)
def test_decode_argument_json_decodes_strings_and_keeps_their_original_text(argument, expected):
    assert decode_argument(argument) == expected


def test_decode_argument_keeps_very_long_integer_literals_as_numbers():
    decoded, original = decode_argument("9" * 5000)
    assert decoded == float("inf") and original == "9" * 5000


# --------------------------------------------------------------------------------------------
# equal_to / not_equal_to
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "argument", "expected"),
    [
        ("pro", "pro", True),
        ("pro", "Pro", False),  # case-sensitive
        ("pro", '"pro"', True),  # JSON string argument
        ("", "", True),
        (_ABSENT, "", True),  # missing reads as ""
        (None, "", True),  # null is missing
        (_ABSENT, '""', True),
        (_ABSENT, "pro", False),
        (_ABSENT, "null", False),
        (None, "null", False),
        ("null", "null", True),  # only a string equal to the original text "null"
        ("", "null", False),
        # numbers compare as floats
        (5, "5", True),
        (5.0, "5", True),
        (5, "5.0", True),
        (5, 5, True),
        (5, 5.0, True),
        (5, "6", False),
        (2**53, str(2**53 + 1), True),  # beyond 2^53 precision is lost
        # "5" vs 5: different kinds, unless the string equals the original text
        ("5", "5", True),  # CSV-imported "5" matches argument "5"
        ("5", 5, False),  # non-string argument has no original text
        (5, '"5"', False),  # string argument "5" vs number 5
        ("5.0", "5", False),
        ("05", "5", False),
        ("05", "05", True),  # "05" is not JSON, so it stays text
        (" 7", " 7", True),
        (7, " 7", True),  # " 7" decodes to 7
        ("1e3", "1e3", True),
        (1000, "1e3", True),
        ("1000", "1e3", False),
        # booleans are never numbers
        (True, "true", True),
        (True, True, True),
        (False, "false", True),
        (True, "1", False),
        (1, "true", False),
        (True, 1, False),
        (0, False, False),
        ("true", "true", True),  # string equal to the original text
        ("true", True, False),
        # lists and objects
        (["a", "b"], '["a","b"]', True),
        (["a", "b"], ["a", "b"], True),
        (["b", "a"], '["a","b"]', False),  # order matters
        (["a"], '["a","b"]', False),  # length matters
        ([1, 2], "[1.0, 2]", True),
        ([True], "[1]", False),
        ([None], "[null]", True),
        ([], "[]", True),
        ([["a"]], '[["a"]]', False),  # nested lists have no key
        ('["a","b"]', '["a","b"]', False),  # list argument: only a list property
        (["a"], "a", False),  # list property, scalar argument
        ({"a": 1}, '{"a": 1}', False),  # object argument: false
        ('{"a": 1}', '{"a": 1}', False),
        ({"a": 1}, "x", False),
        ("Zoë", "Zoë", True),
    ],
)
def test_equal_to(value, argument, expected):
    assert check(value, "equal_to", argument) is expected
    assert check(value, "not_equal_to", argument) is (not expected)


def test_missing_property_reads_as_empty_string():
    assert check(_ABSENT, "equal_to", "") is True
    assert check(_ABSENT, "not_equal_to", "pro") is True
    assert check(_ABSENT, "contains", "") is True
    assert check(_ABSENT, "contains", "a") is False


def test_equal_to_null_argument_written_as_json_null_matches_nothing():
    assert check("null", "equal_to", None) is False
    assert check(_ABSENT, "equal_to", None) is False
    assert check(None, "not_equal_to", None) is True


def test_equal_to_on_nested_path_through_null_or_string_reads_as_empty_string():
    user = {"id": "u", "a": None, "s": "text"}
    assert check(None, "equal_to", "", prop="recipient.a.b", user=user) is True
    assert check(None, "equal_to", "", prop="recipient.s.b", user=user) is True
    assert check(None, "not_equal_to", "text", prop="recipient.s.b", user=user) is True


# --------------------------------------------------------------------------------------------
# Ordering and is_between
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "argument", "gt", "gte", "lt", "lte"),
    [
        (5, "3", True, True, False, False),
        (5, "5", False, True, False, True),
        (5, "5.0", False, True, False, True),
        (5, 7, False, False, True, True),
        (5.5, "5", True, True, False, False),
        (-1, "0", False, False, True, True),
        ("5", "3", True, True, False, False),  # numeric string property
        ("-2.50", "-3", True, True, False, False),
        ("1e3", "999", True, True, False, False),
        # no numeric value: all false
        ("05", "3", False, False, False, False),
        (" 7", "3", False, False, False, False),
        ("+5", "3", False, False, False, False),
        ("abc", "3", False, False, False, False),
        ("", "0", False, False, False, False),
        (_ABSENT, "0", False, False, False, False),
        (None, "0", False, False, False, False),
        (True, "0", False, False, False, False),
        ([5], "3", False, False, False, False),
        ({"v": 5}, "3", False, False, False, False),
        # argument not a number: all false (no lexicographic ordering)
        (5, '"3"', False, False, False, False),
        (5, "abc", False, False, False, False),
        ("b", "a", False, False, False, False),
        (1, "true", False, False, False, False),
        (1, True, False, False, False, False),
        (5, "[3]", False, False, False, False),
        (5, "null", False, False, False, False),
    ],
)
def test_ordering_operators_compare_numbers_only(value, argument, gt, gte, lt, lte):
    assert check(value, "greater_than", argument) is gt
    assert check(value, "greater_than_or_equal_to", argument) is gte
    assert check(value, "less_than", argument) is lt
    assert check(value, "less_than_or_equal_to", argument) is lte


@pytest.mark.parametrize(
    ("value", "argument", "expected"),
    [
        (5, "[1, 10]", True),
        (1, "[1, 10]", True),  # inclusive low
        (10, "[1, 10]", True),  # inclusive high
        (10.0001, "[1, 10]", False),
        (0.9999, "[1, 10]", False),
        (5, [1, 10], True),
        (5, "[5, 5]", True),
        (5, "[10, 1]", False),  # reversed bounds: empty range
        ("5", "[1, 10]", True),
        ("1e1", "[1, 10]", True),
        ("05", "[1, 10]", False),
        (_ABSENT, "[0, 10]", False),
        (True, "[0, 10]", False),
        (5, "[1, true]", False),
        (5, '["1", "10"]', False),
        (5, "[1, 10, 20]", False),
        (5, "[1]", False),
        (5, "5", False),
        (-2.5, [-3, -2], True),
    ],
)
def test_is_between_is_an_inclusive_numeric_range(value, argument, expected):
    assert check(value, "is_between", argument) is expected


# --------------------------------------------------------------------------------------------
# contains family
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "argument", "expected"),
    [
        # property text, argument scalar: substring of the original text, case-sensitive
        ("premium plan", "premium", True),
        ("premium plan", "Premium", False),
        ("premium plan", "", True),  # "" is a substring of everything
        ("abc", "abcd", False),
        ("order 55", "5", True),  # original text "5"
        ("order 5.0", "5.0", True),
        ("order 5", "5.0", False),  # substring of the original text, not the number
        ("is true", "true", True),
        ('say "hi" now', '"hi"', True),  # original text includes the quotes
        ("hi", '"hi"', False),
        ("value 5", 5, True),  # non-string argument: its JSON text
        ("value 5.0", 5.0, True),
        ("value 5", 5.0, False),
        ("it is true", True, True),
        ("", "", True),
        # property missing (""), argument scalar
        (_ABSENT, "", True),
        (_ABSENT, "a", False),
        (None, "", True),
        # property number/boolean, argument scalar: false
        (55, "5", False),
        (5, "5", False),
        (True, "true", False),
        # property text/scalar/missing, argument list: the property's key is among the items
        ("a", '["a","b"]', True),
        ("c", '["a","b"]', False),
        ("ab", '["a","b"]', False),  # no substring matching here
        (5, "[5, 6]", True),
        (5, "[5.0]", True),
        ("5", "[5]", False),  # key of "5" is a string
        (True, "[true]", True),
        (True, "[1]", False),
        (_ABSENT, '["", "x"]', True),  # missing = ""
        (_ABSENT, '["x"]', False),
        ("a", ["a"], True),
        ("a", "[]", False),
        # property list, argument scalar: some item has its key or equals its original text
        (["a", "b"], "a", True),
        (["a", "b"], "c", False),
        (["ab"], "a", False),  # item equality, not substring
        ([5, 6], "5", True),
        ([5.0], 5, True),
        (["5"], "5", True),  # string item equal to the original text
        (["5"], 5, False),  # non-string argument: key only
        ([5], '"5"', False),
        ([True], "true", True),
        ([1], "true", False),
        (["true"], "true", True),
        ([None], "null", False),  # null argument is not a scalar
        (["null"], "null", False),
        ([], "a", False),
        ([["a"]], "a", False),
        # property list, argument list: some item key is shared
        (["a", "b"], '["b","c"]', True),
        (["a", "b"], '["c","d"]', False),
        ([1, 2], "[2.0]", True),
        ([True], "[1]", False),
        ([None], "[null]", True),
        (["a"], "[]", False),
        ([], '["a"]', False),
        ([["a"]], '[["a"]]', False),  # nested lists have no key
        # objects anywhere: false
        ({"a": 1}, "a", False),
        ({"a": 1}, '["a"]', False),
        ("a", '{"a": 1}', False),
        (["a"], '{"a": 1}', False),
        ([{"a": 1}], '[{"a": 1}]', False),
        # null argument (text "null" decodes to null): false
        ("nullable", "null", False),
        ("x", None, False),
    ],
)
def test_contains(value, argument, expected):
    assert check(value, "contains", argument) is expected
    assert check(value, "not_contains", argument) is (not expected)


def test_not_contains_is_true_for_lists_sharing_no_items():
    assert check(["a", "b"], "not_contains", '["c"]') is True
    assert check(["a", "b"], "not_contains", '["b"]') is False


@pytest.mark.parametrize(
    ("value", "argument", "expected"),
    [
        (["a", "b", "c"], '["a","b"]', True),
        (["a", "b", "c"], '["a","d"]', False),
        (["a"], '["a","a"]', True),
        (["a"], "[]", True),  # every item of an empty list is present
        ([], "[]", True),
        ([], '["a"]', False),
        ([1, 2], "[2.0, 1]", True),
        ([True], "[1]", False),
        ([None, "x"], "[null]", True),
        ([["a"]], '[["a"]]', False),
        (["a", "b"], ["a"], True),
        # scalar argument: a one-item list, matched like contains
        (["a", "b"], "a", True),
        (["a", "b"], "c", False),
        ([5], "5", True),
        (["5"], "5", True),  # string item equal to the original text
        (["5"], 5, False),
        (["ab"], "a", False),
        # property not a list: false
        ("a", '["a"]', False),
        ("abc", "a", False),
        (_ABSENT, "[]", False),
        (_ABSENT, '[""]', False),
        (5, "[5]", False),
        ({"a": 1}, '["a"]', False),
        # null or object argument: false
        ([None], "null", False),
        (["a"], '{"a": 1}', False),
    ],
)
def test_contains_all(value, argument, expected):
    assert check(value, "contains_all", argument) is expected
    assert check(value, "not_contains_all", argument) is (not expected)


# --------------------------------------------------------------------------------------------
# empty / exists
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "empty", "exists"),
    [
        (_ABSENT, True, False),
        (None, True, False),
        ("", True, True),
        ([], True, True),
        ({}, False, True),
        (" ", False, True),
        (0, False, True),
        (False, False, True),
        ("0", False, True),
        ([None], False, True),
        ("x", False, True),
    ],
)
def test_empty_and_exists(value, empty, exists):
    assert check(value, "empty") is empty
    assert check(value, "not_empty") is (not empty)
    assert check(value, "exists") is exists
    assert check(value, "not_exists") is (not exists)


def test_exists_through_nested_paths():
    user = {"id": "u", "a": {"b": ""}, "n": None, "s": "x"}
    assert check(None, "exists", prop="recipient.a.b", user=user) is True
    assert check(None, "exists", prop="recipient.n.b", user=user) is False
    assert check(None, "exists", prop="recipient.s.b", user=user) is False
    assert check(None, "empty", prop="recipient.s.b", user=user) is True


# --------------------------------------------------------------------------------------------
# Time arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("7 days ago", NOW - timedelta(days=7)),
        ("1 day ago", NOW - timedelta(hours=24)),
        ("30 minutes from now", NOW + timedelta(minutes=30)),
        ("15 minutes ago", NOW - timedelta(minutes=15)),
        ("2 hours from now", NOW + timedelta(hours=2)),
        ("1 hour ago", NOW - timedelta(hours=1)),
        ("3 weeks ago", NOW - timedelta(days=21)),
        ("1 week from now", NOW + timedelta(days=7)),
        ("30_days_ago", NOW - timedelta(days=30)),
        ("2_hours_from_now", NOW + timedelta(hours=2)),
        ("15_minutes_ago", NOW - timedelta(minutes=15)),
        ('"7 days ago"', NOW - timedelta(days=7)),  # JSON string argument
        ({"value": 7, "unit": "days", "direction": "ago"}, NOW - timedelta(days=7)),
        ({"value": 1, "unit": "week", "direction": "from_now"}, NOW + timedelta(weeks=1)),
        ({"value": 20, "unit": "minutes", "direction": "from now"}, NOW + timedelta(minutes=20)),
        ('{"value": 2, "unit": "hours", "direction": "ago"}', NOW - timedelta(hours=2)),
    ],
)
def test_relative_time_is_exactly_value_times_unit_from_now(argument, expected):
    assert resolve_time_argument(argument, {"id": "u"}, NOW) == expected


@pytest.mark.parametrize(
    "argument",
    [
        "14 minutes ago",
        "1 minute from now",
        "14_minutes_from_now",
        {"value": 14, "unit": "minutes", "direction": "ago"},
    ],
)
def test_relative_time_below_15_minutes_is_an_error(argument):
    with pytest.raises(ValueError, match="15-minute minimum"):
        resolve_time_argument(argument, {"id": "u"}, NOW)


def test_relative_time_below_15_minutes_raises_from_the_operator_too():
    with pytest.raises(ValueError):
        check("2025-06-15", "is_timestamp_before", "10 minutes ago")
    with pytest.raises(ValueError):  # even when the property has no timestamp value
        check(_ABSENT, "is_timestamp_on_or_after", "10 minutes ago")


@pytest.mark.parametrize(
    "argument",
    [
        "0 days ago",
        "-3 days ago",
        "7.5 days ago",
        "7 days",
        "7 months ago",
        "7 Days Ago",
        "7  days ago",
        " 7 days ago",
        "7_days ago",
        "7 days from_now",
        "7 days from now ",
        "seven days ago",
        "yesterday",
        "banana",
        "",
        {"value": 0, "unit": "days", "direction": "ago"},
        {"value": 7.0, "unit": "days", "direction": "ago"},
        {"value": "7", "unit": "days", "direction": "ago"},
        {"value": True, "unit": "days", "direction": "ago"},
        {"value": 7, "unit": "months", "direction": "ago"},
        {"value": 7, "unit": "days", "direction": "later"},
        {"value": 7, "unit": ["days"], "direction": "ago"},
        {"value": 7, "unit": "days"},
        {"value": 7, "unit": "days", "direction": "ago", "extra": 1},
        {"value": 10**12, "unit": "weeks", "direction": "ago"},  # out of range
        1e20,  # Unix seconds outside years 1..9999
        "-62135596801",
        "253402300800",
        "1e400",
        "NaN",
        True,
        None,
        ["2025-01-01"],
        "2025-02-30",
        "{{ plan }}",
        "{{ recipient. }}",
    ],
)
def test_unusable_time_argument_is_an_error(argument):
    with pytest.raises(ValueError):
        resolve_time_argument(argument, {"id": "u"}, NOW)


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("2025-06-15T14:30:00Z", datetime(2025, 6, 15, 14, 30, tzinfo=UTC)),
        ("2025-01-01", datetime(2025, 1, 1, tzinfo=UTC)),
        ("2025-01-01 08:00+01:00", datetime(2025, 1, 1, 7, 0, tzinfo=UTC)),
        ('"2025-01-01"', datetime(2025, 1, 1, tzinfo=UTC)),
        # a number (the argument is JSON-decoded first) is Unix seconds
        ("1788825601", datetime(2026, 9, 8, 0, 0, 1, tzinfo=UTC)),
        (1788825601, datetime(2026, 9, 8, 0, 0, 1, tzinfo=UTC)),
        ("1788825601.25", datetime(2026, 9, 8, 0, 0, 1, 250000, tzinfo=UTC)),
        ("-62135596800", datetime(1, 1, 1, tzinfo=UTC)),
        ("253402300799", datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ],
)
def test_absolute_time_argument_is_an_iso_timestamp(argument, expected):
    assert resolve_time_argument(argument, {"id": "u"}, NOW) == expected


@pytest.mark.parametrize(
    ("argument", "user", "expected"),
    [
        ("{{ recipient.ends_at }}", {"ends_at": "2025-07-01"}, datetime(2025, 7, 1, tzinfo=UTC)),
        ("{{recipient.ends_at}}", {"ends_at": "2025-07-01"}, datetime(2025, 7, 1, tzinfo=UTC)),
        ("{{ recipient.ends_at }}", {"ends_at": 0}, datetime(1970, 1, 1, tzinfo=UTC)),
        (
            "{{ recipient.sub.ends }}",
            {"sub": {"ends": "2025-07-01"}},
            datetime(2025, 7, 1, tzinfo=UTC),
        ),
        ("{{ recipient.ends_at }}", {}, None),  # missing
        ("{{ recipient.ends_at }}", {"ends_at": None}, None),
        ("{{ recipient.ends_at }}", {"ends_at": "soon"}, None),  # no timestamp value
        ("{{ recipient.ends_at }}", {"ends_at": True}, None),
        ("{{ recipient.sub.ends }}", {"sub": "x"}, None),
    ],
)
def test_dynamic_time_argument_reads_another_property(argument, user, expected):
    assert resolve_time_argument(argument, {"id": "u", **user}, NOW) == expected


def test_dynamic_time_argument_cannot_use_reserved_properties():
    with pytest.raises(ValueError, match="cannot be used"):
        resolve_time_argument("{{ recipient.created_at }}", {"id": "u"}, NOW)


# --------------------------------------------------------------------------------------------
# Timestamp operators
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "argument", "before"),
    [
        ("2025-06-07", "7 days ago", True),  # 2025-06-08T12:00 is the bound
        ("2025-06-08T12:00:00Z", "7 days ago", False),  # equal: on or after
        ("2025-06-08T11:59:59.999999Z", "7 days ago", True),
        ("2025-06-08T13:00:00+01:00", "7 days ago", False),  # same instant as the bound
        ("2025-06-15T12:29", "30 minutes from now", True),
        ("2025-06-15T12:30", "30 minutes from now", False),
        ("2025-06-15T12:00", "2025-06-15T12:00:00.000001Z", True),
        (1749988800, "2025-06-15T12:00:00Z", False),  # epoch exactly NOW
        (1749988799, "2025-06-15T12:00:00Z", True),
        ("1749988799", "2025-06-15T12:00:00Z", True),
        ("2025-06-01", {"value": 1, "unit": "weeks", "direction": "ago"}, True),
    ],
)
def test_timestamp_before_and_on_or_after(value, argument, before):
    for operator in ("is_timestamp_before", "is_timestamp_before_date"):
        assert check(value, operator, argument) is before
    for operator in ("is_timestamp_on_or_after", "is_timestamp_on_or_after_date"):
        assert check(value, operator, argument) is (not before)


@pytest.mark.parametrize("value", [_ABSENT, None, "", "soon", "2025-02-30", True, ["2025-01-01"]])
def test_timestamp_operators_are_false_without_a_timestamp_value(value):
    for operator in ("is_timestamp_before", "is_timestamp_on_or_after"):
        assert check(value, operator, "2025-01-01") is False
    assert check(value, "is_timestamp_between", '["2000-01-01", "2100-01-01"]') is False
    assert check(value, "is_timestamp_before_now") is False
    assert check(value, "is_timestamp_on_or_after_now") is False


def test_timestamp_operator_with_dynamic_argument_compares_two_properties():
    user = {"id": "u", "trial_ends_at": "2025-07-01", "paid_at": "2025-06-20"}
    argument = "{{ recipient.trial_ends_at }}"
    assert check(None, "is_timestamp_before", argument, prop="paid_at", user=user) is True
    assert check(None, "is_timestamp_on_or_after", argument, prop="paid_at", user=user) is False


def test_timestamp_operator_with_missing_dynamic_argument_is_false():
    user = {"id": "u", "paid_at": "2025-06-20"}
    argument = "{{ recipient.trial_ends_at }}"
    assert check(None, "is_timestamp_before", argument, prop="paid_at", user=user) is False
    assert check(None, "is_timestamp_on_or_after", argument, prop="paid_at", user=user) is False


@pytest.mark.parametrize(
    ("value", "argument", "expected"),
    [
        ("2025-06-01", '["2025-01-01", "2025-12-31"]', True),
        ("2025-01-01", '["2025-01-01", "2025-12-31"]', True),  # inclusive start
        ("2025-12-31", '["2025-01-01", "2025-12-31"]', True),  # inclusive end
        ("2025-12-31T00:00:01", '["2025-01-01", "2025-12-31"]', False),
        ("2024-12-31T23:59:59", ["2025-01-01", "2025-12-31"], False),
        ("2025-06-10", '["7 days ago", "1 day from now"]', True),
        ("2025-06-01", '["7 days ago", "1 day from now"]', False),
        ("2025-06-10", '["2025-12-31", "2025-01-01"]', False),  # reversed: empty
        ("2025-06-10", ["{{ recipient.start }}", "2025-12-31"], True),
        ("2025-06-10", ["{{ recipient.nope }}", "2025-12-31"], False),  # missing bound
    ],
)
def test_is_timestamp_between_is_inclusive(value, argument, expected):
    user = {"id": "u", "p": value, "start": "2025-06-01"}
    assert check(None, "is_timestamp_between", argument, user=user) is expected


@pytest.mark.parametrize(
    "argument",
    ['["2025-01-01"]', "2025-01-01", '["2025-01-01", "x"]', '["10 minutes ago", "2025-12-31"]'],
)
def test_is_timestamp_between_with_unusable_argument_is_an_error(argument):
    with pytest.raises(ValueError):
        check("2025-06-10", "is_timestamp_between", argument)


@pytest.mark.parametrize(
    ("value", "before_now"),
    [
        ("2025-06-15T11:59:59.999999Z", True),
        ("2025-06-15T12:00:00Z", False),  # t == now is on or after
        ("2025-06-15T14:00:00+02:00", False),
        ("2099-01-01", False),
        ("1999-01-01", True),
        (0, True),
        (1749988800, False),
    ],
)
def test_timestamp_before_now_and_on_or_after_now(value, before_now):
    assert check(value, "is_timestamp_before_now") is before_now
    assert check(value, "is_timestamp_on_or_after_now") is (not before_now)


def test_now_may_be_given_in_another_timezone():
    paris_now = NOW.astimezone(timezone(timedelta(hours=2)))
    user = {"id": "u", "p": "2025-06-15T12:00:00Z"}
    condition = {"property": "p", "operator": "is_timestamp_on_or_after_now"}
    assert evaluate_condition(condition, user, now=paris_now) is True


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-06-15", True),
        ("2025-06-15T12:00:00Z", True),
        (1750000000, True),
        ("1750000000", True),
        (0, True),
        ("2025-02-30", False),
        ("05", False),
        ("soon", False),
        ("", False),
        (_ABSENT, False),
        (None, False),
        (True, False),
        ([], False),
        ({}, False),
        (1e20, False),
    ],
)
def test_is_timestamp_and_is_not_timestamp(value, expected):
    assert check(value, "is_timestamp") is expected
    assert check(value, "is_not_timestamp") is (not expected)


# --------------------------------------------------------------------------------------------
# Audience membership and random cohorts
# --------------------------------------------------------------------------------------------


def test_is_audience_member_asks_is_member_with_audience_key_and_user_id():
    calls = []

    def is_member(audience_key, user_id):
        calls.append((audience_key, user_id))
        return audience_key == "vip" and user_id == "user-1"

    def membership(operator, key):
        return check(None, operator, key, prop="recipient", is_member=is_member)

    assert membership("is_audience_member", "vip") is True
    assert membership("is_not_audience_member", "vip") is False
    assert membership("is_audience_member", "other") is False
    assert membership("is_not_audience_member", "other") is True
    assert calls == [("vip", "user-1"), ("vip", "user-1"), ("other", "user-1"), ("other", "user-1")]


def test_audience_membership_inside_an_audience():
    audience = {
        "segments": [
            {
                "conditions": [
                    {"property": "recipient", "operator": "is_audience_member", "argument": "vip"},
                    PLAN_PRO,
                ]
            }
        ]
    }
    members = {("vip", "u1"), ("vip", "u3")}

    def is_member(key, user_id):
        return (key, user_id) in members

    assert evaluate_audience(audience, PRO_FR_USER, now=NOW, is_member=is_member) is True
    assert evaluate_audience(audience, PRO_US_USER, now=NOW, is_member=is_member) is False
    assert evaluate_audience(audience, FREE_US_USER, now=NOW, is_member=is_member) is False


@pytest.mark.parametrize("operator", ["is_audience_member", "is_not_audience_member"])
def test_audience_membership_without_is_member_raises(operator):
    with pytest.raises(ValueError):
        check(None, operator, "vip", prop="recipient")


@pytest.mark.parametrize("argument", [_ABSENT, None, 5, "", ["vip"]])
def test_audience_membership_needs_an_audience_key(argument):
    with pytest.raises(ValueError):
        check(None, "is_audience_member", argument, prop="recipient", is_member=lambda k, u: True)


def _bucket(user_id):
    return int(hashlib.md5(user_id.encode()).hexdigest()[:8], 16) % 100


@pytest.mark.parametrize("user_id", ["user-1", "user-2", "abc", "ünïcödé", ""])
def test_is_in_random_cohort_uses_the_md5_bucket_of_the_user_id(user_id):
    bucket = _bucket(user_id)
    user = {"id": user_id}

    def in_cohort(argument):
        return check(None, "is_in_random_cohort", argument, prop="recipient.id", user=user)

    assert in_cohort(str(bucket)) is False  # bucket < bucket is false
    assert in_cohort(str(bucket + 1)) is True
    assert in_cohort(bucket + 0.5) is True
    assert in_cohort("0") is False
    assert in_cohort("100") is True


@pytest.mark.parametrize(
    ("user_id", "argument", "expected"),
    [
        # md5("user-1") = d6d77053... -> 0xd6d77053 = 3604443219 -> bucket 19
        ("user-1", "19", False),
        ("user-1", "20", True),
        ("user-1", 19.5, True),
        # md5("abc") = 90015098... -> 0x90015098 = 2416005272 -> bucket 72
        ("abc", "72", False),
        ("abc", "73", True),
    ],
)
def test_is_in_random_cohort_known_buckets(user_id, argument, expected):
    user = {"id": user_id}
    assert check(None, "is_in_random_cohort", argument, prop="recipient.id", user=user) is expected


@pytest.mark.parametrize("argument", ["abc", "true", True, "[50]", _ABSENT])
def test_is_in_random_cohort_needs_a_number(argument):
    with pytest.raises(ValueError):
        check(None, "is_in_random_cohort", argument, prop="recipient.id")
