"""The same users through a typed Parquet source and through JSON lines: every audience has the
same members, and they are the members the reference evaluator (`conditions/reference.py`)
gives for the users as the JSON lines describe them. A typed column's type is the property's
JSON type (a VARCHAR "5" is a string, an INTEGER 5 a number, a TIMESTAMP an ISO 8601 string), so
whichever way users arrive, the conditions of docs/conditions.md see the same values."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import duckdb
import polars as pl
import pytest
from condition_harness import NOW, matching_ids

from audiences.conditions.compiler import Condition
from audiences.conditions.reference import evaluate_audience
from audiences.users import load_source
from audiences.users.sources import UserSource

LOADED_AT = datetime(2026, 10, 1, tzinfo=UTC)
PLANS = ["free", "pro", "enterprise", "5", "", None]
TAGS = [["admin"], ["admin", "billing"], [], None, ["5", "x"]]


def _users() -> list[dict]:
    """Typed users: strings (some that look like numbers), integers, floats, booleans, UTC
    timestamps, lists of strings, a nested object, and missing values of each."""
    users = []
    for n in range(60):
        users.append(
            {
                "id": f"user_{n:03d}",
                "plan": PLANS[n % len(PLANS)],
                "seats": None if n % 7 == 0 else n * 3 - 20,
                "mrr": None if n % 5 == 0 else round(n * 12.5 - 100, 2),
                "is_verified": None if n % 4 == 0 else n % 3 == 0,
                "last_seen_at": None
                if n % 6 == 0
                else NOW - timedelta(days=n, hours=n % 5, microseconds=n * 1000),
                "tags": TAGS[n % len(TAGS)],
                "address": {"country": ["DE", "FR", "US", None][n % 4], "zip": f"{10000 + n}"},
            }
        )
    return users


AUDIENCES: dict[str, list[list[dict]]] = {
    "paying": [[{"property": "plan", "operator": "contains", "argument": '["pro", "enterprise"]'}]],
    "plan-five-or-empty": [
        [{"property": "plan", "operator": "equal_to", "argument": "5"}],
        [{"property": "plan", "operator": "empty"}],
    ],
    "many-seats": [[{"property": "seats", "operator": "greater_than", "argument": "10"}]],
    "mid-mrr": [[{"property": "mrr", "operator": "is_between", "argument": "[0, 300]"}]],
    "verified": [[{"property": "is_verified", "operator": "equal_to", "argument": "true"}]],
    "unverified-or-unknown": [
        [{"property": "is_verified", "operator": "not_equal_to", "argument": "true"}]
    ],
    "seen-this-month": [
        [
            {
                "property": "last_seen_at",
                "operator": "is_timestamp_on_or_after",
                "argument": "30 days ago",
            }
        ]
    ],
    "never-seen": [[{"property": "last_seen_at", "operator": "not_exists"}]],
    "admins": [[{"property": "tags", "operator": "contains", "argument": "admin"}]],
    "admin-billing": [
        [{"property": "tags", "operator": "contains_all", "argument": '["admin", "billing"]'}]
    ],
    "no-tags": [[{"property": "tags", "operator": "empty"}]],
    "germany": [[{"property": "address.country", "operator": "equal_to", "argument": "DE"}]],
    "zip-prefix": [[{"property": "address.zip", "operator": "contains", "argument": "1002"}]],
    # `contains` with a scalar argument matches text only: a number or boolean read as a string
    # would add members here (the plan segment keeps each audience non-empty).
    "numbers-are-not-text": [
        [{"property": "seats", "operator": "contains", "argument": "1"}],
        [{"property": "mrr", "operator": "contains", "argument": "."}],
        [{"property": "is_verified", "operator": "contains", "argument": "true"}],
        [{"property": "plan", "operator": "equal_to", "argument": "pro"}],
    ],
    "zip-number": [[{"property": "address.zip", "operator": "greater_than", "argument": "10040"}]],
}


def _parquet(users: list[dict], path) -> None:
    frame = pl.DataFrame(
        {
            "id": [u["id"] for u in users],
            "plan": [u["plan"] for u in users],
            "seats": [u["seats"] for u in users],
            "mrr": [u["mrr"] for u in users],
            "is_verified": [u["is_verified"] for u in users],
            "last_seen_at": [u["last_seen_at"] for u in users],
            "tags": [u["tags"] for u in users],
            "address.country": [u["address"]["country"] for u in users],
            "address.zip": [u["address"]["zip"] for u in users],
        },
        schema={
            "id": pl.String,
            "plan": pl.String,
            "seats": pl.Int64,
            "mrr": pl.Float64,
            "is_verified": pl.Boolean,
            "last_seen_at": pl.Datetime("us", "UTC"),
            "tags": pl.List(pl.String),
            "address.country": pl.String,
            "address.zip": pl.String,
        },
    )
    frame.write_parquet(path)


def _plain(value):
    """A typed value as JSON has it: a timestamp as ISO 8601 text, nulls left out."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items() if item is not None}
    return value


def _documents(users: list[dict]) -> list[dict]:
    return [
        {key: _plain(value) for key, value in user.items() if value is not None} for user in users
    ]


def _json_lines(users: list[dict], path) -> None:
    lines = [json.dumps(document) for document in _documents(users)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _warehouse(source: UserSource) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect()
    connection.execute("set TimeZone = 'UTC'")
    result = load_source(connection, source, LOADED_AT)
    assert result.rows_quarantined == 0
    return connection


@pytest.mark.parametrize("flattened", [False, True], ids=["inline", "flattened"])
def test_typed_parquet_and_json_lines_give_every_audience_the_same_members(tmp_path, flattened):
    users = _users()
    _parquet(users, tmp_path / "users.parquet")
    _json_lines(users, tmp_path / "users.jsonl")
    typed = _warehouse(UserSource("typed", "parquet", tmp_path / "users.parquet"))
    documents = _warehouse(UserSource("documents", "jsonl", tmp_path / "users.jsonl"))
    for key, segments in AUDIENCES.items():
        compiled = [[Condition.from_json(c) for c in segment] for segment in segments]
        from_parquet = matching_ids(typed, compiled, flattened=flattened)
        from_json = matching_ids(documents, compiled, flattened=flattened)
        assert from_parquet == from_json, key
        reference = {
            document["id"]
            for document in _documents(users)
            if evaluate_audience(
                {"segments": [{"conditions": segment} for segment in segments]}, document, now=NOW
            )
        }
        assert from_parquet == reference, key
        # Each audience tells some users apart, so equal members are not equal emptiness.
        assert 0 < len(from_json) < len(users), key
