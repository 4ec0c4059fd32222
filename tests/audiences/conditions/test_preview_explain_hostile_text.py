"""`preview` and `explain` (audiences/warehouse/queries.py) agree with the reference evaluator on names and
values holding quotes, backslashes, Jinja, LIKE wildcards, newlines and JSON-looking text (issue 13),
on a real DuckDB warehouse file."""

from __future__ import annotations

from pathlib import Path

import pytest
from condition_harness import NOW, insert_users

from audiences.conditions.definitions import parse_definition
from audiences.conditions.reference import evaluate_condition
from audiences.warehouse import queries as warehouse

KEYS = ['"quoted"', "it's\\{{ %_\n", "tags"]
VALUES = [
    '"q"',
    "q",
    "'q'",
    "a\\b",
    '"a\\\\b"',
    "a\nb",
    "50%",
    "a_b",
    "abc",
    "{{ x }}",
    "{% y %}",
    "NaN",
    '"5"',
    "5",
    5,
    '""',
    "",
    '{"a": 1}',
    ['"q"'],
    ["q", "50%"],
    ["a_b"],
    [["q"]],
    "é",
    '"\\u00e9"',
    1788825600,
    "2026-09-08T00:00:01Z",
]
ARGUMENTS = [
    '"q"',
    "q",
    "'q'",
    "a\\b",
    '"a\\\\b"',
    "a\nb",
    "%",
    "_",
    "a%c",
    "{{ x }}",
    "{%",
    "NaN",
    '"5"',
    "5",
    '""',
    "",
    '["\\"q\\"", "%"]',
    '[["q"]]',
    '"\\u00e9"',
    5,
]
OPERATORS = [
    "equal_to",
    "not_equal_to",
    "contains",
    "not_contains",
    "contains_all",
    "not_contains_all",
]


@pytest.fixture(scope="module")
def connection(tmp_path_factory):
    users = [{"id": "missing"}] + [
        {"id": f"{k}-{n}", key: value}
        for k, key in enumerate(KEYS)
        for n, value in enumerate(VALUES)
    ]
    connection = warehouse.connect(tmp_path_factory.mktemp("warehouse") / "warehouse.duckdb")
    insert_users(connection, users)
    yield connection, users
    connection.close()


def _conditions():
    for key in KEYS:
        for operator in OPERATORS:
            for argument in ARGUMENTS:
                yield {"property": f"recipient.{key}", "operator": operator, "argument": argument}
        for argument in ["1788825601", 1788825600, "[1788825600, 1788825601]"]:
            operator = (
                "is_timestamp_between" if str(argument).startswith("[") else "is_timestamp_before"
            )
            yield {"property": f"recipient.{key}", "operator": operator, "argument": argument}


def test_preview_agrees_with_the_reference_on_hostile_text(connection):
    connection, users = connection
    for condition in _conditions():
        definition = parse_definition(
            {"name": "Hostile", "type": "dynamic", "segments": [{"conditions": [condition]}]},
            "hostile",
            Path("hostile/audience.json"),
        )
        expected = {user["id"] for user in users if evaluate_condition(condition, user, now=NOW)}
        shown = warehouse.preview(
            connection, definition, {"hostile": definition}, NOW, sample_size=len(users)
        )
        assert (shown.count, {row["user_id"] for row in shown.sample}) == (
            len(expected),
            expected,
        ), condition


@pytest.mark.parametrize("key", KEYS[:2])
def test_explain_agrees_with_the_reference_on_hostile_text(connection, key):
    """One audience with a condition on `key` per segment: explain gives each one's verdict."""
    connection, users = connection
    conditions = [
        c
        for c in _conditions()
        if c["property"] == f"recipient.{key}"
        and c["operator"] in ("equal_to", "contains", "is_timestamp_before", "is_timestamp_between")
    ]
    definition = parse_definition(
        {
            "name": "Hostile",
            "type": "dynamic",
            "segments": [{"conditions": [condition]} for condition in conditions],
        },
        "hostile",
        Path("hostile/audience.json"),
    )
    for user in users:
        if key not in user and user["id"] != "missing":
            continue
        explanation = warehouse.explain(
            connection, definition, {"hostile": definition}, user["id"], NOW
        )
        verdicts = [verdict.result for verdict in explanation.verdicts]
        assert verdicts == [
            evaluate_condition(condition, user, now=NOW) for condition in conditions
        ], user


def test_explain_shows_the_quoted_value_and_a_true_verdict(connection):
    """The issue's own case: the property `"quoted"` holds `"q"` (quotes included)."""
    connection, _users = connection
    condition = {"property": 'recipient."quoted"', "operator": "equal_to", "argument": '"q"'}
    definition = parse_definition(
        {"name": "Q", "type": "dynamic", "segments": [{"conditions": [condition]}]},
        "q",
        Path("q/audience.json"),
    )
    [verdict] = warehouse.explain(connection, definition, {"q": definition}, "0-0", NOW).verdicts
    assert (verdict.value, verdict.result) == ('"\\"q\\""', True)
