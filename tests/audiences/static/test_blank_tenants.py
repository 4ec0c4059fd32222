"""A blank or whitespace-only tenant is no tenant, on every write path (issue 20, defect 1) and in
SQL, so `check` and `is_audience_member` agree."""

from __future__ import annotations

import duckdb
import polars as pl
import pytest
import sqlalchemy as sa

from audiences.static.syncs import Sync, run_sync
from audiences.static.uploads import upload_csv
from audiences.store.members import Member, change_members, is_member
from audiences.users.sources import UserSource

SPELLINGS = [None, "", " ", "  ", "\t", " \n\r\v\f ", "acme", " acme ", "\u00a0", "a b"]


def memberships(store) -> list[tuple]:
    return [
        (row["user_id"], row["tenant"], row["tenant_key"])
        for row in store.rows(
            sa.text(
                "select user_id, tenant, tenant_key from audience_members "
                "where audience_key = 'vips' order by user_id, tenant_key"
            )
        )
    ]


def entered(store) -> list[tuple]:
    return [
        (row["user_id"], row["tenant"])
        for row in store.rows(
            sa.text(
                "select user_id, tenant from membership_events where event_type = 'entered' "
                "order by user_id"
            )
        )
    ]


@pytest.mark.parametrize("tenant", SPELLINGS)
def test_python_and_sql_say_the_same_tenant_is_blank(tenant):
    """`normalize_tenant` and its SQL forms, evaluated by DuckDB, agree on every spelling."""
    from audiences.conditions.compiler import normalized_tenant, render, without_tenant
    from audiences.store.database import normalize_tenant, tenant_key

    connection = duckdb.connect()
    normalized, blank = connection.execute(
        f"select {render(normalized_tenant())}, {render(without_tenant())} from (select ? as tenant)",
        [tenant],
    ).fetchone()
    assert normalized == normalize_tenant(tenant)
    assert blank is (normalize_tenant(tenant) is None)
    assert tenant_key(tenant) == (normalized or "")


def test_the_cli_and_library_writes_keep_one_member_without_tenant(store):
    change_members(store, "vips", [Member("b1", "")], "add")
    change_members(store, "vips", [Member("b1", None), Member("b1", "  ")], "add")
    assert memberships(store) == [("b1", None, "")]
    assert entered(store) == [("b1", None)]
    assert is_member(store, "vips", "b1") and is_member(store, "vips", "b1", " ")
    assert change_members(store, "vips", [Member("b1", "\t")], "remove").changed == 1
    assert memberships(store) == []


def test_an_upload_keeps_blank_tenants_as_no_tenant(store, tmp_path):
    path = tmp_path / "members.csv"
    path.write_text('id,tenant\nb1,\nb1,"  "\nb1,acme\nb2,"\t"\n', encoding="utf-8")
    result = upload_csv(
        store,
        "vips",
        path,
        {"vips": "static"},
        tenant_column="tenant",
        rejects_file=tmp_path / "rejects.csv",
    )
    assert result.members_added == 3
    assert memberships(store) == [("b1", None, ""), ("b1", "acme", "acme"), ("b2", None, "")]


def test_a_sync_keeps_blank_tenants_as_no_tenant_and_removes_nothing_for_them(store, tmp_path):
    path = tmp_path / "vips.parquet"

    def sync(rows) -> Sync:
        pl.DataFrame(
            rows, schema={"id": pl.String, "account": pl.String}, orient="row"
        ).write_parquet(path)
        return Sync(
            "crm_vips",
            "vips",
            UserSource("crm_vips", "parquet", path, "stream"),
            "account",
            "mirror",
        )

    first = run_sync(store, sync([("b1", ""), ("b1", "  "), ("b2", "acme")]), {"vips": "static"})
    assert (first.added, first.removed) == (2, 0)
    assert memberships(store) == [("b1", None, ""), ("b2", "acme", "acme")]
    # The same member spelled without tenant: nothing to add, nothing to remove.
    second = run_sync(store, sync([("b1", None), ("b2", "acme")]), {"vips": "static"})
    assert (second.added, second.removed) == (0, 0)
    assert memberships(store) == [("b1", None, ""), ("b2", "acme", "acme")]
    third = run_sync(store, sync([("b2", "acme")]), {"vips": "static"})
    assert (third.added, third.removed) == (0, 1)
    assert memberships(store) == [("b2", "acme", "acme")]
