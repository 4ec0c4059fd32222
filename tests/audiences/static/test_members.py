"""Static membership: no-op adds and removes, tenants, the one tenant-strict check, triggers."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import duckdb
import polars as pl
import pytest
import sqlalchemy as sa
from condition_harness import insert_users

from audiences.membership.changes import CircuitBreaker
from audiences.static.syncs import Sync, run_sync
from audiences.store.members import (
    Member,
    MembershipError,
    change_members,
    is_member,
    require_static,
)
from audiences.users.sources import UserSource
from audiences.workflows.publish import process_static_triggers
from audiences.workflows.triggers import WorkflowTrigger

NOW = datetime(2026, 11, 27, tzinfo=UTC)


def events(store) -> list[tuple]:
    return [
        tuple(row.values())
        for row in store.rows(
            sa.text(
                "select user_id, tenant, event_type, entry_number from membership_events order by occurred_at, user_id"
            )
        )
    ]


def test_adding_an_existing_member_and_removing_a_non_member_are_no_ops(store):
    assert change_members(store, "vips", [Member("u1")], "add").changed == 1
    assert change_members(store, "vips", [Member("u1")], "add").changed == 0
    assert change_members(store, "vips", [Member("u2")], "remove").changed == 0
    assert change_members(store, "vips", [Member("u1")], "remove").changed == 1
    assert change_members(store, "vips", [Member("u1")], "add").changed == 1
    assert events(store) == [
        ("u1", None, "entered", 1),
        ("u1", None, "exited", 1),
        ("u1", None, "entered", 2),
    ]


def test_one_user_under_three_tenants_and_tenant_strict_checks(store):
    change_members(
        store,
        "vips",
        [Member("u1", "acme"), Member("u1", "globex"), Member("u1", "initech")],
        "add",
    )
    assert is_member(store, "vips", "u1", "acme") and is_member(store, "vips", "u1", "globex")
    assert not is_member(store, "vips", "u1", "umbrella")  # another tenant
    assert not is_member(
        store, "vips", "u1"
    )  # a run with no tenant matches only tenant-less members
    change_members(store, "vips", [Member("u1")], "add")
    assert is_member(store, "vips", "u1")
    change_members(store, "vips", [Member("u1", "acme")], "remove")
    assert not is_member(store, "vips", "u1", "acme") and is_member(store, "vips", "u1", "globex")


def test_dynamic_and_unknown_audiences_refuse_members():
    with pytest.raises(MembershipError, match="'pros' is a dynamic audience"):
        require_static("pros", {"pros": "dynamic"})
    with pytest.raises(MembershipError, match="unknown audience 'nope'"):
        require_static("nope", {})


def test_static_events_trigger_per_tenant_and_missing_users_never_trigger(store):
    warehouse = duckdb.connect()
    warehouse.execute("set TimeZone = 'UTC'")
    insert_users(warehouse, [{"id": "u1"}, {"id": "u2"}])
    triggers = {
        "welcome": WorkflowTrigger(
            "welcome", "vips", trigger_frequency="once_per_recipient_per_tenant"
        )
    }
    process_static_triggers(
        warehouse, store, triggers, "file", NOW
    )  # the trigger is registered first
    change_members(
        store,
        "vips",
        [Member("u1", "acme"), Member("u1", "globex"), Member("ghost", "acme")],
        "add",
    )
    report = process_static_triggers(warehouse, store, triggers, "file", NOW)
    assert (report.events, report.deliveries) == (3, 2)
    payloads = [
        json.loads(row["payload"]) for row in store.rows(sa.text("select payload from deliveries"))
    ]
    assert sorted(p["tenant"] for p in payloads) == ["acme", "globex"]
    warehouse.execute("insert into raw.users values (3, 'ghost', '{}', 'test', now(), now(), null)")
    again = process_static_triggers(
        warehouse, store, triggers, "file", NOW
    )  # identified later: no retro trigger
    assert (again.events, again.deliveries) == (0, 0)
    change_members(store, "vips", [Member("u1", "acme")], "remove")
    change_members(store, "vips", [Member("u1", "acme")], "add")  # re-entry under the same tenant
    assert process_static_triggers(warehouse, store, triggers, "file", NOW).deliveries == 0


def sync(tmp_path, rows, mode="mirror") -> Sync:
    path = tmp_path / "vips.parquet"
    pl.DataFrame(rows, schema={"id": pl.String, "account": pl.String}, orient="row").write_parquet(
        path
    )
    return Sync(
        "crm_vips", "vips", UserSource("crm_vips", "parquet", path, "stream"), "account", mode
    )


def test_mirror_sync_writes_only_the_difference(store, tmp_path):
    types = {"vips": "static"}
    first = run_sync(store, sync(tmp_path, [("u1", "acme"), ("u2", None), ("u3", None)]), types)
    assert (first.added, first.removed) == (3, 0)
    second = run_sync(store, sync(tmp_path, [("u1", "acme"), ("u3", None), ("u4", "acme")]), types)
    assert (second.added, second.removed) == (1, 1)
    assert len(events(store)) == 5  # 3 + 1 entered, 1 exited: nothing rewritten
    assert not is_member(store, "vips", "u2") and is_member(store, "vips", "u4", "acme")
    insert_only = run_sync(store, sync(tmp_path, [("u5", None)], mode="insert"), types)
    assert (insert_only.added, insert_only.removed) == (1, 0)


def test_a_sync_from_an_emptied_table_is_held(store, tmp_path):
    types = {"vips": "static"}
    breaker = CircuitBreaker(share=0.2, minimum=3)
    run_sync(store, sync(tmp_path, [(f"u{i}", None) for i in range(10)]), types, breaker)
    held = run_sync(store, sync(tmp_path, []), types, breaker)
    assert held.held_batch and held.removed == 0
    assert len(store.rows(sa.text("select * from audience_members"))) == 10
    from audiences.workflows.publish import release_batch

    release_batch(store, held.held_batch)
    applied = run_sync(store, sync(tmp_path, []), types, breaker)
    assert (applied.removed, applied.held_batch) == (10, None)


def test_a_batch_prepared_at_once_has_the_ids_and_members_of_one_by_one():
    """An upload's change is worked out a column at a time (event ids in DuckDB): the same
    members (first of repeated rows, blank tenants none) and the same ids as `prepare_change`."""
    from audiences.store.members import Member, prepare_change, prepare_checked_change

    rows = [
        ("u1", None),
        ("ü ñ 😀", None),
        ("u2", "acme"),
        ("a\x1fb", "t é"),
        ("u3", "  "),
        ("u1", None),
        ("u2", "acme"),
        ("u2", None),
    ]
    for action in ("add", "remove"):
        one_by_one = prepare_change("vip-1", [Member(*row) for row in rows], action)
        at_once = prepare_checked_change(
            "vip-1",
            pl.DataFrame(
                {"user_id": [r[0] for r in rows], "tenant": [r[1] for r in rows]},
                schema={"user_id": pl.String, "tenant": pl.String},
            ),
            action,
        )
        assert at_once.wanted == one_by_one.wanted
        assert list(at_once.wanted) == list(one_by_one.wanted)
        assert at_once.first_ids == one_by_one.first_ids
