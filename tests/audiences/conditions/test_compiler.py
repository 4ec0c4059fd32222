"""The compiled SQL of every operator, on real DuckDB, pinned to expected results.

Each case runs three ways: compiled SQL reading JSON inline, compiled SQL over the flattened
typed-column table (what dbt builds), and the independent reference evaluator. All three must give
the expected answer.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from condition_harness import NOW, connect_memory, insert_users, matching_ids

from audiences.conditions.compiler import (
    Condition,
    ConditionError,
    attributes_used,
    compile_condition,
)
from audiences.conditions.reference import evaluate_condition

MISSING = object()


def _case(operator, argument, value, expected, path="p"):
    return pytest.param(
        operator,
        argument,
        value,
        expected,
        path,
        id=f"{operator}-{argument!r}-{'missing' if value is MISSING else repr(value)}"[:90],
    )


CASES = [
    # equal_to / not_equal_to
    _case("equal_to", "pro", "pro", True),
    _case("equal_to", "pro", "Pro", False),
    _case("equal_to", "pro", MISSING, False),
    _case("equal_to", "", MISSING, True),
    _case("equal_to", "", "", True),
    _case("equal_to", "null", MISSING, False),
    _case("equal_to", "null", "null", True),
    _case("equal_to", "null", None, False),
    _case("equal_to", "5", 5, True),
    _case("equal_to", "5", 5.0, True),
    _case("equal_to", "5", "5", True),
    _case("equal_to", "5", "5.0", False),
    _case("equal_to", "true", True, True),
    _case("equal_to", "true", 1, False),
    _case("equal_to", "1", True, False),
    _case("equal_to", "true", "true", True),
    _case("equal_to", '["a","b"]', ["a", "b"], True),
    _case("equal_to", '["a","b"]', ["b", "a"], False),
    _case("equal_to", "Zoë 東京 🎉", "Zoë 東京 🎉", True),
    _case("not_equal_to", "pro", MISSING, True),
    _case("not_equal_to", "pro", "pro", False),
    _case("not_equal_to", "pro", [], True),
    # ordering and ranges
    _case("greater_than", "5", 6, True),
    _case("greater_than", "5", 5, False),
    _case("greater_than", "5", "6", True),
    _case("greater_than", "5", "06", False),
    _case("greater_than", "5", " 7", False),
    _case("greater_than", "5", "+7", False),
    _case("greater_than", "5", "1e3", True),
    _case("greater_than", "5", True, False),
    _case("greater_than", "5", MISSING, False),
    _case("greater_than", "5", [6], False),
    _case("greater_than_or_equal_to", "5", 5.0, True),
    _case("less_than", "0", -2.5, True),
    _case("less_than", "0", "-2.50", True),
    _case("less_than_or_equal_to", "10", 10, True),
    _case("less_than_or_equal_to", "10", "abc", False),
    _case("is_between", "[1, 10]", 1, True),
    _case("is_between", "[1, 10]", 10, True),
    _case("is_between", "[1, 10]", 10.01, False),
    _case("is_between", "[1, 10]", "3", True),
    _case("is_between", "[1, 10]", MISSING, False),
    # contains family
    _case("contains", "ell", "hello", True),
    _case("contains", "ELL", "hello", False),
    _case("contains", "a", ["a", "b"], True),
    _case("contains", "a", ["ab"], False),
    _case("contains", "5", [5, 6], True),
    _case("contains", "5", ["5"], True),
    _case("contains", '["x","b"]', ["a", "b"], True),
    _case("contains", '["x","y"]', ["a", "b"], False),
    _case("contains", '["pro","team"]', "pro", True),
    _case("contains", '["pro","team"]', "professional", False),
    _case("contains", '["", "x"]', MISSING, True),
    _case("contains", "x", MISSING, False),
    _case("contains", "", MISSING, True),
    _case("contains", "5", 12345, False),
    _case("contains", "a", {"a": 1}, False),
    _case("not_contains", "x", MISSING, True),
    _case("not_contains", "a", ["a"], False),
    _case("contains_all", '["a","b"]', ["a", "b", "c"], True),
    _case("contains_all", '["a","z"]', ["a", "b", "c"], False),
    _case("contains_all", "a", ["a"], True),
    _case("contains_all", '["a"]', "a", False),
    _case("contains_all", '["a"]', MISSING, False),
    _case("not_contains_all", '["a","z"]', ["a", "b"], True),
    _case("not_contains_all", '["a","b"]', ["a", "b"], False),
    # empty / exists
    _case("empty", None, MISSING, True),
    _case("empty", None, None, True),
    _case("empty", None, "", True),
    _case("empty", None, [], True),
    _case("empty", None, {}, False),
    _case("empty", None, 0, False),
    _case("empty", None, [None], False),
    _case("not_empty", None, "x", True),
    _case("not_empty", None, [], False),
    _case("exists", None, "", True),
    _case("exists", None, [], True),
    _case("exists", None, None, False),
    _case("exists", None, MISSING, False),
    _case("exists", None, False, True),
    _case("not_exists", None, MISSING, True),
    _case("not_exists", None, 0, False),
    # timestamps (now is 2026-11-01T00:00:00Z)
    _case("is_timestamp_before", "7 days ago", "2026-10-24T23:59:59Z", True),
    _case("is_timestamp_before", "7 days ago", "2026-10-25T00:00:00Z", False),
    _case("is_timestamp_on_or_after", "7 days ago", "2026-10-25T00:00:00Z", True),
    _case("is_timestamp_on_or_after", "7_days_ago", "2026-10-25T00:00:00+00:00", True),
    _case("is_timestamp_on_or_after", "1 day from now", "2026-11-02T00:00:00Z", True),
    _case("is_timestamp_on_or_after", "1 day from now", "2026-11-01T23:59:59Z", False),
    _case("is_timestamp_before", "2025-06-15T14:30:00Z", "2025-06-15T16:29:59+02:00", True),
    _case("is_timestamp_before", "2025-06-15T14:30:00Z", "2025-06-15T16:30:00+02:00", False),
    _case("is_timestamp_before", "2025-06-15", "2025-06-14", True),
    _case("is_timestamp_before", "2025-06-15", "2025-06-14 23:59", True),
    _case("is_timestamp_before", "2025-06-15", 1749945599, True),
    _case("is_timestamp_before", "2025-06-15", "1749945599", True),
    _case("is_timestamp_before", "2025-06-15", "yesterday", False),
    _case("is_timestamp_before", "2025-06-15", "2025-02-30", False),
    _case("is_timestamp_before", "2025-06-15", "2025-06-14T24:00:00Z", False),
    _case("is_timestamp_before", "2025-06-15", MISSING, False),
    _case("is_timestamp_before", "2025-06-15", True, False),
    _case("is_timestamp_between", '["2025-01-01","2025-12-31"]', "2025-12-31", True),
    _case("is_timestamp_between", '["2025-01-01","2025-12-31"]', "2025-12-31T00:00:01Z", False),
    _case("is_timestamp_before_now", None, "2026-10-31T23:59:59Z", True),
    _case("is_timestamp_before_now", None, "2026-11-01T00:00:00Z", False),
    _case("is_timestamp_on_or_after_now", None, "2026-11-01T00:00:00Z", True),
    _case("is_timestamp", None, "2025-01-01T00:00:00.123456789Z", True),
    _case("is_timestamp", None, 0, True),
    _case("is_timestamp", None, "not a date", False),
    _case("is_timestamp", None, 1e20, False),
    _case("is_not_timestamp", None, "not a date", True),
    _case("is_timestamp_before_date", "2025-01-01", "2024-12-31", True),
    _case("is_timestamp_on_or_after_date", "2025-01-01", "2025-01-01", True),
    # epoch-second arguments: the argument is JSON-decoded, and a number is Unix seconds (issue 13)
    _case("is_timestamp_before", "1788825601", "2026-09-08T00:00:00Z", True),
    _case("is_timestamp_before", "1788825601", "2026-09-08T00:00:01Z", False),
    _case("is_timestamp_on_or_after", "1788825601", "2026-09-08T00:00:01Z", True),
    _case("is_timestamp_on_or_after", 1788825601, 1788825601, True),
    _case("is_timestamp_before", 1788825601, "1788825600", True),
    _case("is_timestamp_before", "1788825601.5", "2026-09-08T00:00:01.4Z", True),
    _case("is_timestamp_before", "1788825601.5", "2026-09-08T00:00:01.5Z", False),
    _case("is_timestamp_before", "-86400", "1969-12-30T23:59:59Z", True),
    _case("is_timestamp_before", "1e9", "2001-09-09T01:46:39Z", True),
    _case("is_timestamp_before", "1e9", "2001-09-09T01:46:40Z", False),
    _case("is_timestamp_before_date", "0", "1969-12-31", True),
    _case("is_timestamp_on_or_after_date", "0", "1970-01-01", True),
    _case("is_timestamp_between", "[1788825600, 1788825601]", "2026-09-08T00:00:01Z", True),
    _case("is_timestamp_between", "[1788825600, 1788825601]", "2026-09-08T00:00:01.000001Z", False),
    _case(
        "is_timestamp_between",
        '[1788825600, "2026-09-08T00:00:00.5Z"]',
        "2026-09-08T00:00:01Z",
        False,
    ),
    _case("is_timestamp_between", '["2026-09-07", 1788825601]', 1788825601, True),
    _case("is_timestamp_between", [1788825600, 1788825602], "2026-09-08T00:00:01Z", True),
    _case("is_timestamp_before", '"2025-06-15"', "2025-06-14", True),
    _case("is_timestamp_before", '"7 days ago"', "2026-10-24T23:59:59Z", True),
    # nested and hostile paths
    _case("equal_to", "Paris", "Paris", True, path="address.city"),
    _case("equal_to", "x", "x", True, path='a"; drop table users; --'),
    _case("equal_to", "it's {{ x }} {% y %}", "it's {{ x }} {% y %}", True, path="{{ var('x') }}"),
    _case("equal_to", "v", "v", True, path="ключ.名前"),
    _case("equal_to", "v", "v", True, path="with/slash.and~tilde"),
    # original text holding quotes, backslashes, LIKE wildcards, newlines, JSON-looking text (issue 13)
    _case("equal_to", '"q"', '"q"', True, path='"quoted"'),
    _case("not_equal_to", '"q"', '"q"', False, path='"quoted"'),
    _case("equal_to", '"q"', "q", True, path='"quoted"'),
    _case("equal_to", '""', '""', True),
    _case("equal_to", '""', MISSING, True),
    _case("not_equal_to", '""', '""', False),
    _case("equal_to", '"5"', '"5"', True),
    _case("equal_to", '"5"', 5, False),
    _case("equal_to", '"null"', '"null"', True),
    _case("equal_to", '"true"', '"true"', True),
    _case("equal_to", '"\\u00e9"', '"\\u00e9"', True),
    _case("equal_to", '"\\u00e9"', "é", True),
    _case("equal_to", '"a\\\\b"', "a\\b", True, path="back\\slash"),
    _case("equal_to", '"a\\\\b"', '"a\\\\b"', True, path="back\\slash"),
    _case("equal_to", "a\\b", "a\\b", True, path="it's"),
    _case("equal_to", "line\nbreak", "line\nbreak", True, path="new\nline"),
    _case("equal_to", '"line\\nbreak"', "line\nbreak", True, path="{{ x }}"),
    _case("equal_to", "NaN", "NaN", True),
    _case("equal_to", "-Infinity", "-Infinity", True),
    _case("not_contains", "Infinity", "Infinity!", False),
    _case("equal_to", "[[1]]", [[1]], False),
    _case("contains", "[[1]]", [[1]], False),
    _case("contains_all", '[{"a":1}]', [{"a": 1}], False),
    _case("contains", "%", "100%", True, path="50%_off"),
    _case("contains", "%", "100", False, path="50%_off"),
    _case("contains", "a_c", "abc", False),
    _case("contains", "a%c", "abc", False),
    _case("contains", "_", "a_b", True),
    _case("contains", '"q"', 'say "q"', True),
    _case("contains", '"q"', "q", False),
    _case("contains", '"q"', ['"q"'], True),
    _case("contains", '"q"', ["q"], True),
    _case("contains_all", '"q"', ['"q"'], True),
    _case("contains", "it's", "it's here", True),
    _case("contains", "{{ x }}", "a {{ x }} b", True),
    _case("contains", 5, ["5"], False),
    _case("contains", 5, [5.0], True),
    _case("contains_all", 5, ["5"], False),
    _case("equal_to", '"\\ud83c"', "x", False),
    _case("not_equal_to", '"\\ud83c"', "x", True),
    _case("equal_to", '"\\ud83c"', '"\\ud83c"', True),
    _case("contains", '["\\ud83c", "x"]', ["x"], True),
    _case("contains", '["\\ud83c"]', ["x"], False),
    # docs/conditions.md, `contains_all`: null and object arguments match
    # nothing, an empty list argument is held by every list.
    _case("contains_all", "null", [None], False),
    _case("not_contains_all", "null", [None, "null"], True),
    _case("contains_all", '{"a":1}', [{"a": 1}, "a"], False),
    _case("not_contains_all", '{"a":1}', [{"a": 1}], True),
    _case("contains_all", "[]", ["a"], True),
    _case("contains_all", "[]", [], True),
    _case("contains_all", "[]", "", False),
]


def _user(path: str, value) -> dict:
    user: dict = {"id": "user_1"}
    if value is MISSING:
        return user
    node = user
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return user


@pytest.mark.parametrize("operator, argument, value, expected, path", CASES)
def test_operator_semantics(operator, argument, value, expected, path):
    condition = {"property": f"recipient.{path}", "operator": operator}
    if argument is not None:
        condition["argument"] = argument
    user = _user(path, value)
    connection = connect_memory()
    insert_users(connection, [user])
    parsed = Condition.from_json(condition)
    inline = matching_ids(connection, [[parsed]]) == {"user_1"}
    flattened = matching_ids(connection, [[parsed]], flattened=True) == {"user_1"}
    reference = evaluate_condition(condition, user, now=NOW)
    assert (inline, flattened, reference) == (expected, expected, expected)


def test_missing_property_reads_as_empty_string():
    connection = connect_memory()
    insert_users(connection, [{"id": "a"}, {"id": "b", "plan": "pro"}])
    not_pro = Condition.from_json(
        {"property": "recipient.plan", "operator": "not_equal_to", "argument": "pro"}
    )
    assert matching_ids(connection, [[not_pro]]) == {"a"}


def test_path_through_a_string_or_null_is_missing():
    connection = connect_memory()
    insert_users(
        connection,
        [
            {"id": "string", "address": "Paris"},
            {"id": "null", "address": None},
            {"id": "object", "address": {"city": "Paris"}},
        ],
    )
    missing = Condition.from_json({"property": "recipient.address.city", "operator": "not_exists"})
    assert matching_ids(connection, [[missing]]) == {"string", "null"}


def test_segments_are_ored_and_conditions_anded():
    connection = connect_memory()
    insert_users(
        connection,
        [{"id": "a", "x": 1, "y": 1}, {"id": "b", "x": 1, "y": 2}, {"id": "c", "z": True}],
    )
    x1 = Condition.from_json({"property": "x", "operator": "equal_to", "argument": "1"})
    y1 = Condition.from_json({"property": "y", "operator": "equal_to", "argument": "1"})
    z = Condition.from_json({"property": "z", "operator": "equal_to", "argument": "true"})
    assert matching_ids(connection, [[x1, y1], [z]]) == {"a", "c"}
    assert matching_ids(connection, []) == set()
    assert matching_ids(connection, [[]]) == set()


def test_audience_membership_reads_the_other_audience_without_tenant():
    connection = connect_memory()
    insert_users(connection, [{"id": "a"}, {"id": "b"}])
    member = Condition.from_json(
        {"property": "recipient", "operator": "is_audience_member", "argument": "vips"}
    )
    not_member = Condition.from_json(
        {"property": "recipient", "operator": "is_not_audience_member", "argument": "vips"}
    )
    assert matching_ids(connection, [[member]], members={"vips": {"b"}}) == {"b"}
    assert matching_ids(connection, [[not_member]], members={"vips": {"b"}}) == {"a"}


def test_random_cohort_is_deterministic_and_matches_reference():
    users = [{"id": f"user_{i}"} for i in range(400)]
    connection = connect_memory()
    insert_users(connection, users)
    raw = {"property": "recipient.id", "operator": "is_in_random_cohort", "argument": "25"}
    compiled = matching_ids(connection, [[Condition.from_json(raw)]])
    expected = {u["id"] for u in users if evaluate_condition(raw, u, now=NOW)}
    assert compiled == expected
    assert 60 < len(compiled) < 140


def test_relative_time_is_exact_to_the_minute():
    connection = connect_memory()
    insert_users(
        connection,
        [{"id": "a", "t": "2026-10-31T23:45:00Z"}, {"id": "b", "t": "2026-10-31T23:44:59Z"}],
    )
    recent = Condition.from_json(
        {
            "property": "t",
            "operator": "is_timestamp_on_or_after",
            "argument": {"value": 15, "unit": "minutes", "direction": "ago"},
        }
    )
    assert matching_ids(connection, [[recent]]) == {"a"}
    later = datetime(2026, 11, 1, 0, 1, tzinfo=UTC)
    assert matching_ids(connection, [[recent]], now=later) == set()


def test_dynamic_time_argument_compares_two_properties():
    connection = connect_memory()
    insert_users(
        connection,
        [
            {"id": "renewed", "paid_at": "2026-10-02", "due_at": "2026-10-01"},
            {"id": "late", "paid_at": "2026-09-30", "due_at": "2026-10-01"},
            {"id": "unknown", "paid_at": "2026-09-30"},
        ],
    )
    late = Condition.from_json(
        {
            "property": "paid_at",
            "operator": "is_timestamp_before",
            "argument": "{{ recipient.due_at }}",
        }
    )
    assert matching_ids(connection, [[late]]) == {"late"}


@pytest.mark.parametrize(
    "argument", ["{{recipient.due_at}}", "{{\trecipient.due_at\n}}", "{{ recipient.due_at}}"]
)
def test_dynamic_time_argument_takes_any_whitespace_inside_its_braces(argument):
    connection = connect_memory()
    insert_users(
        connection,
        [
            {"id": "late", "paid_at": "2026-09-30", "due_at": "2026-10-01"},
            {"id": "renewed", "paid_at": "2026-10-02", "due_at": "2026-10-01"},
        ],
    )
    late = Condition.from_json(
        {"property": "paid_at", "operator": "is_timestamp_before", "argument": argument}
    )
    assert matching_ids(connection, [[late]]) == {"late"}


@pytest.mark.parametrize(
    "raw, field, message",
    [
        (
            {"property": "recipient.x", "operator": "is_like", "argument": "a"},
            "operator",
            "unknown operator",
        ),
        (
            {"property": "recipient.x", "operator": "greater_than", "argument": "ten"},
            "argument",
            "not a number",
        ),
        (
            {"property": "recipient.x", "operator": "is_between", "argument": "[1]"},
            "argument",
            "[low, high]",
        ),
        (
            {
                "property": "recipient.x",
                "operator": "is_timestamp_before",
                "argument": "10 minutes ago",
            },
            "argument",
            "15 minutes",
        ),
        (
            {"property": "recipient.x", "operator": "is_timestamp_before", "argument": "soon"},
            "argument",
            "not a time",
        ),
        (
            {"property": "recipient.x", "operator": "empty", "argument": "x"},
            "argument",
            "takes no argument",
        ),
        ({"property": "recipient.created_at", "operator": "exists"}, "property", "reserved"),
        (
            {"property": "recipient", "operator": "is_audience_member", "argument": "Not A Key"},
            "argument",
            "audience key",
        ),
        (
            {"property": "recipient.x", "operator": "is_in_random_cohort", "argument": "10"},
            "property",
            "recipient.id",
        ),
        ({"property": "", "operator": "exists"}, "property", "non-empty"),
        (
            {"property": "recipient.x", "operator": "equal_to", "argument": "\ud83c"},
            "argument",
            "not valid Unicode",
        ),
        (
            {"property": "recipient.x", "operator": "is_timestamp_before", "argument": "1e20"},
            "argument",
            "years 1..9999",
        ),
        (
            {
                "property": "recipient.x",
                "operator": "is_timestamp_on_or_after",
                "argument": "-62135596801",
            },
            "argument",
            "years 1..9999",
        ),
        (
            {"property": "recipient.x", "operator": "is_timestamp_before", "argument": "1e400"},
            "argument",
            "years 1..9999",
        ),
        (
            {
                "property": "recipient.x",
                "operator": "is_timestamp_before",
                "argument": 253402300800,
            },
            "argument",
            "years 1..9999",
        ),
        (
            {
                "property": "recipient.x",
                "operator": "is_timestamp_between",
                "argument": "[0, 1e20]",
            },
            "argument[1]",
            "years 1..9999",
        ),
        (
            {"property": "recipient.x", "operator": "is_timestamp_before", "argument": "NaN"},
            "argument",
            "not a time",
        ),
        (
            {"property": "recipient.x", "operator": "is_timestamp_before", "argument": "true"},
            "argument",
            "not a time",
        ),
        # only the documented time forms, as the reference evaluator reads them
        (
            {
                "property": "recipient.x",
                "operator": "is_timestamp_before",
                "argument": "7 Days Ago",
            },
            "argument",
            "not a time",
        ),
        (
            {
                "property": "recipient.x",
                "operator": "is_timestamp_before",
                "argument": " 7 days ago",
            },
            "argument",
            "not a time",
        ),
        (
            {
                "property": "recipient.x",
                "operator": "is_timestamp_before",
                "argument": "7 dayss ago",
            },
            "argument",
            "not a time",
        ),
        (
            {
                "property": "recipient.x",
                "operator": "is_timestamp_before",
                "argument": "{{ due_at }}",
            },
            "argument",
            "not a time",
        ),
        (
            {
                "property": "recipient.x",
                "operator": "is_timestamp_before",
                "argument": "{{ recipient.created_at }}",
            },
            "argument",
            "reserved",
        ),
        (
            {
                "property": "recipient.x",
                "operator": "is_timestamp_before",
                "argument": {"value": 7, "unit": "days", "direction": "ago", "extra": 1},
            },
            "argument",
            "relative time object",
        ),
        (
            {
                "property": "recipient.x",
                "operator": "is_timestamp_before",
                "argument": {"value": 7, "unit": "Days", "direction": "ago"},
            },
            "argument",
            "unknown time unit",
        ),
        (
            {
                "property": "recipient.x",
                "operator": "is_timestamp_before",
                "argument": "99999999999999 weeks ago",
            },
            "argument",
            "beyond years 1..9999",
        ),
        ({"property": "recipient.\udc00", "operator": "exists"}, "property", "not valid Unicode"),
        # An empty part read a property named "", which no one has: it matched nobody.
        ({"property": "recipient.a..b", "operator": "exists"}, "property", "has an empty part"),
        ({"property": "recipient.", "operator": "equal_to", "argument": "x"}, "property", "empty"),
        # `recipient` alone is the user: `exists` on it passed validation and matched nobody.
        (
            {"property": "recipient", "operator": "exists"},
            "property",
            '"recipient" alone is the user',
        ),
        (
            {"property": "recipient", "operator": "not_equal_to", "argument": "x"},
            "property",
            '"recipient" alone is the user',
        ),
    ],
)
def test_bad_conditions_are_rejected_with_the_field_named(raw, field, message):
    with pytest.raises(ConditionError) as error:
        attributes_used([[Condition.from_json(raw)]])
    assert error.value.field == field
    assert message in str(error.value)


def test_hostile_property_names_and_arguments_stay_data():
    condition = Condition.from_json(
        {
            "property": 'recipient.a"; drop table users; --',
            "operator": "equal_to",
            "argument": "'); drop table users; --",
        }
    )
    connection = connect_memory()
    insert_users(connection, [{"id": "a", 'a"; drop table users; --': "'); drop table users; --"}])
    assert matching_ids(connection, [[condition]]) == {"a"}
    assert matching_ids(connection, [[condition]], flattened=True) == {"a"}
    assert connection.execute("select count(*) from raw.users").fetchone()[0] == 1
    sql = compile_condition(condition, _recording_context()).sql()
    assert "drop table users; --'" in sql.replace("''", "'")


def _recording_context():
    from sqlglot import exp

    from audiences.conditions.compiler import CompileContext

    return CompileContext(
        attribute=lambda a: exp.column(a.column_name, quoted=True),
        audience_members=lambda key: exp.select("user_key").from_("m"),
        evaluation_time=exp.column("now"),
        user_key=exp.column("user_key"),
        user_id=exp.column("user_id"),
    )
