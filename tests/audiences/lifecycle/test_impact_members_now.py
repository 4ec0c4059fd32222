"""A dry run's "members now" are the target's current members as its history holds them: the open
membership intervals (which the promotion's diff compares its evaluation with) and, for a static
audience, its members in the store, not whatever the last evaluation's `audience_members` table
holds. Over a copy of the session's sample run (real dbt, real diff), production's
`audience_members` is changed as an evaluation that was not yet recorded would leave it; the
dry run must not move."""

from __future__ import annotations

import copy
import json
import os
import shutil
from datetime import UTC, datetime

import duckdb
import pytest
from condition_harness import ROOT

from audiences.lifecycle.impact import impact
from audiences.settings import Settings

LATER = datetime(2026, 11, 2, tzinfo=UTC)
# One audience the scan measures, one measured alone (per tenant), one static.
SCANNED, PER_TENANT, STATIC = "eu-customers", "workspace-admins-trial-ending", "vip-customers"


def definition(key: str) -> dict:
    return json.loads((ROOT / "data" / "audiences" / key / "audience.json").read_text())


def changed() -> tuple[dict, dict]:
    """Before and after: the scanned audience inverted, the per-tenant one without its first
    condition, the static one renamed."""
    before = {key: definition(key) for key in (SCANNED, PER_TENANT, STATIC)}
    after = copy.deepcopy(before)
    after[SCANNED]["segments"][0]["conditions"][0]["operator"] = "not_contains"
    after[PER_TENANT]["segments"][0]["conditions"].pop()
    after[STATIC]["name"] = "VIP customers (renamed)"
    return before, after


@pytest.fixture
def production(sample_run, tmp_path, monkeypatch) -> Settings:
    """Production is a copy of the sample run's warehouse, with a store of its own."""
    for name in [name for name in os.environ if name.startswith("AUDIENCES_")]:
        if name != "AUDIENCES_DBT_PROJECT":
            monkeypatch.delenv(name)
    warehouse = tmp_path / "production.duckdb"
    shutil.copy(sample_run, warehouse)
    monkeypatch.setenv("AUDIENCES_DUCKDB", str(tmp_path / "development.duckdb"))
    monkeypatch.setenv("AUDIENCES_DEFINITIONS", str(ROOT / "data" / "audiences"))
    monkeypatch.setenv("AUDIENCES_DUCKDB_PRODUCTION", str(warehouse))
    monkeypatch.setenv("AUDIENCES_DEFINITIONS_PRODUCTION", str(ROOT / "data" / "audiences"))
    monkeypatch.setenv("AUDIENCES_STORE_URL_PRODUCTION", f"sqlite:///{tmp_path}/production.sqlite")
    return Settings.from_env()


def measured(settings: Settings) -> dict[str, tuple]:
    before, after = changed()
    result = impact(settings, "production", before, after, now=LATER)
    return {
        each.audience_key: (
            each.members_now,
            each.members_after,
            each.entered,
            each.exited,
            each.entered_sample,
            each.exited_sample,
        )
        for each in result.audiences
    }


def open_intervals(warehouse, key: str) -> int:
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        return connection.execute(
            "select count(*) from raw.membership_intervals "
            "where audience_key = $key and exited_at is null",
            {"key": key},
        ).fetchall()[0][0]


def test_members_now_are_the_open_intervals_not_an_unrecorded_evaluation(production):
    warehouse = production.duckdb_path_for("production")
    first = measured(production)
    assert first[SCANNED][0] == open_intervals(warehouse, SCANNED) > 0
    assert first[PER_TENANT][0] == open_intervals(warehouse, PER_TENANT) > 0
    assert first[SCANNED][2] + first[SCANNED][3] > 0  # the change moves someone

    # An evaluation that was built but not yet recorded (its diff never ran): two members of
    # each audience gone from `audience_members`, and two users added who are not members.
    with duckdb.connect(str(warehouse)) as connection:
        for key in (SCANNED, PER_TENANT):
            connection.execute(
                """
                delete from main.audience_members where audience_key = $key and user_key in (
                    select user_key from main.audience_members where audience_key = $key
                    order by user_key limit 2
                )
                """,
                {"key": key},
            )
            connection.execute(
                """
                insert into main.audience_members (audience_key, user_key, tenant)
                select $key, user_key, null from raw.users
                where user_key not in (
                    select user_key from main.audience_members where audience_key = $key
                )
                order by user_key limit 2
                """,
                {"key": key},
            )
    assert measured(production) == first


def test_a_static_audiences_members_now_are_the_stores(production):
    from audiences.store.database import MembershipStore
    from audiences.store.members import Member, change_members

    warehouse = production.duckdb_path_for("production")
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        in_warehouse = connection.execute(
            "select count(*) from main.audience_members where audience_key = $key",
            {"key": STATIC},
        ).fetchall()[0][0]
    store = MembershipStore(production.store_url_for("production")).create()
    try:
        # Added by hand since the last run: in the store, not yet in the warehouse.
        change_members(store, STATIC, [Member("u-001"), Member("u-002"), Member("u-003")], "add")
    finally:
        store.dispose()
    assert in_warehouse != 3
    members_now, members_after, entered, exited, *_ = measured(production)[STATIC]
    assert (members_now, members_after, entered, exited) == (3, 3, 0, 0)
