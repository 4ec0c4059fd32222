"""The store's copy of users: identify merges, deletions queued for the warehouse, and the
warehouse's users published back with the patches that arrived since."""

from __future__ import annotations

import json
from datetime import UTC

import duckdb
import polars as pl
import sqlalchemy as sa
from hypothesis import example, given, settings
from hypothesis import strategies as st

from audiences.store import database as tables
from audiences.store.profiles import (
    get_profile,
    identify,
    identify_many,
    load_identify_queue,
    merge_patch,
    publish_changed_users,
)
from audiences.warehouse.schema import ensure_user_tables

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.text(max_size=3),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from("abc"), children, max_size=3)
    ),
    max_leaves=8,
)
objects = st.dictionaries(st.sampled_from("abcd"), json_values, max_size=4)


@given(target=objects, patch=objects)
@settings(max_examples=200, deadline=None)
def test_merge_patch_agrees_with_duckdbs_json_merge_patch(target, patch):
    # The store applies identify in Python, the warehouse in DuckDB: they must agree.
    # A connection of its own: the module's shared one may hold another test's unfinished result.
    with duckdb.connect() as connection:
        (expected,) = connection.execute(
            "select json_merge_patch($t::json, $p::json)::varchar",
            {"t": json.dumps(target), "p": json.dumps(patch)},
        ).fetchone()
    assert merge_patch(target, patch) == json.loads(expected)


@given(
    before=st.lists(st.tuples(st.sampled_from("uvw"), objects), max_size=3),
    batch=st.lists(st.tuples(st.sampled_from("uvwx"), objects), min_size=1, max_size=6),
    deleted=st.sampled_from([None, "u", "v"]),
)
@settings(max_examples=40, deadline=None)
# found in CI: a patch that changes nothing (a property set again to the empty list it holds)
@example(before=[("v", {"a": [], "b": []})], batch=[("v", {"a": []})], deleted=None)
def test_identify_many_agrees_with_identify(tmp_path_factory, before, batch, deleted):
    # Uploads merge a batch in DuckDB, the API one patch at a time in Python: same profiles, same queue.
    from audiences.store.database import MembershipStore
    from audiences.store.profiles import delete_user

    results = []
    for way in ("one by one", "batch"):
        store = MembershipStore(
            f"sqlite:///{tmp_path_factory.mktemp('store')}/store.sqlite"
        ).create()
        with store.engine.begin() as connection:
            identify(store, connection, before)
            if deleted:
                delete_user(store, connection, deleted)
        with store.engine.begin() as connection:
            if way == "batch":
                patches = pl.DataFrame(
                    {"user_id": [u for u, _ in batch], "patch": [json.dumps(p) for _, p in batch]}
                )
                assert identify_many(store, connection, patches) == len({u for u, _ in batch})
            else:
                identify(store, connection, batch)
        profiles = {
            u: (get_profile(store, u).properties if get_profile(store, u) else None) for u in "uvwx"
        }
        queued = [
            (row["user_id"], json.loads(row["patch"]))
            for row in store.rows(
                sa.select(tables.user_patches.c.user_id, tables.user_patches.c.patch).order_by(
                    tables.user_patches.c.patch_id
                )
            )
        ]
        results.append((profiles, queued))
        store.dispose()
    assert results[0] == results[1]


def test_identify_merges_into_the_profile_and_queues_the_patch(store):
    with store.engine.begin() as connection:
        identify(store, connection, [("ada", {"name": "Ada", "plan": {"tier": "pro", "seats": 3}})])
    with store.engine.begin() as connection:
        identify(
            store, connection, [("ada", {"plan": {"seats": None}, "email": "ada@example.com"})]
        )
    assert get_profile(store, "ada").properties == {
        "name": "Ada",
        "plan": {"tier": "pro"},
        "email": "ada@example.com",
    }
    queued = store.rows(
        sa.select(tables.user_patches.c.patch).order_by(tables.user_patches.c.patch_id)
    )
    assert [json.loads(row["patch"]) for row in queued] == [
        {"name": "Ada", "plan": {"tier": "pro", "seats": 3}},
        {"plan": {"seats": None}, "email": "ada@example.com"},
    ]


def _queue(store, user_id: str, patch: str) -> None:
    with store.engine.begin() as connection:
        store.insert_rows(
            connection,
            tables.user_patches,
            ("user_id", "patch", "received_at", "loaded"),
            [(user_id, patch, "2026-11-27T00:00:00.000000Z", False)],
        )


def test_a_queued_deletion_applies_between_the_patches_around_it(store, tmp_path):
    from datetime import datetime

    warehouse = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    ensure_user_tables(warehouse)
    for user_id, patch in [
        ("bo", '{"a": 1}'),
        ("bo", "null"),
        ("bo", '{"b": 2}'),
        ("cy", '{"c": 3}'),
        ("cy", "null"),
    ]:
        _queue(store, user_id, patch)
    result = load_identify_queue(warehouse, store, datetime(2026, 11, 27, tzinfo=UTC))
    users = dict(
        warehouse.execute(
            "select user_id, case when deleted_at is null then properties::varchar end from raw.users"
        ).fetchall()
    )
    assert json.loads(users["bo"]) == {"b": 2}  # deleted, then identified afresh
    assert users["cy"] is None  # deleted
    assert result.users_deleted == 2
    assert (
        store.scalar(sa.select(sa.func.count()).where(tables.user_patches.c.loaded == sa.false()))
        == 0
    )


def test_published_warehouse_users_keep_patches_that_arrived_after_the_load(store, tmp_path):
    from datetime import datetime

    warehouse = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    ensure_user_tables(warehouse)
    _queue(store, "dee", '{"plan": "free", "name": "Dee"}')
    load_identify_queue(warehouse, store, datetime(2026, 11, 27, tzinfo=UTC))
    _queue(store, "dee", '{"plan": "pro"}')  # arrives while the run goes on
    assert publish_changed_users(store, warehouse) == 1
    assert get_profile(store, "dee").properties == {"plan": "pro", "name": "Dee"}
    assert publish_changed_users(store, warehouse) == 0  # nothing changed since
