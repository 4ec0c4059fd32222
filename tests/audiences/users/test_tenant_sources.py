"""Tenants and tenant memberships as sources: Knock's tenant shape, the users' upsert, snapshot,
stream and quarantine rules, the store's tenant queue, and memberships naming unknown users."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from audiences.store.database import MembershipStore
from audiences.store.tenants import delete_tenant, load_tenant_queue, set_tenants
from audiences.users import load_source, missing_memberships, missing_memberships_report
from audiences.users.sources import SourceError, UserSource, sources_from_file

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def warehouse(tmp_path):
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    connection.execute("set TimeZone = 'UTC'")
    yield connection
    connection.close()


def source(tmp_path, kind, text, mode="snapshot", name="rows.csv", fmt="csv") -> UserSource:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return UserSource(name.split(".")[0], fmt, path, mode, kind=kind)


def tenants(connection) -> dict[str, dict]:
    rows = connection.execute(
        "select tenant_id, properties from raw.tenants where deleted_at is null"
    ).fetchall()
    return {tenant_id: json.loads(properties) for tenant_id, properties in rows}


def memberships(connection) -> dict[tuple[str, str], dict]:
    rows = connection.execute(
        "select user_id, tenant_id, properties from raw.tenant_memberships where deleted_at is null"
    ).fetchall()
    return {(user, tenant): json.loads(properties) for user, tenant, properties in rows}


def test_sources_file_declares_tenants_and_memberships_beside_users(tmp_path):
    (tmp_path / "sources.yml").write_text(
        "sources:\n  - {name: crm, path: users.csv}\n"
        "tenants:\n  - {name: workspaces, path: tenants.csv}\n"
        "tenant_memberships:\n  - {name: seats, path: seats.jsonl, mode: stream}\n"
    )
    path = tmp_path / "sources.yml"
    assert [s.kind for s in sources_from_file(path)] == ["users"]
    (workspaces,) = sources_from_file(path, "tenants")
    assert (workspaces.name, workspaces.kind, workspaces.format) == ("workspaces", "tenants", "csv")
    (seats,) = sources_from_file(path, "tenant_memberships")
    assert (seats.kind, seats.mode, seats.format) == ("tenant_memberships", "stream", "jsonl")
    (tmp_path / "plain.yml").write_text("sources:\n  - {name: crm, path: users.csv}\n")
    assert sources_from_file(tmp_path / "plain.yml", "tenants") == []
    (tmp_path / "clash.yml").write_text(
        "sources:\n  - {name: crm, path: users.csv}\ntenants:\n  - {name: crm, path: t.csv}\n"
    )
    with pytest.raises(SourceError, match=r"unique across.*'crm'"):
        sources_from_file(tmp_path / "clash.yml", "tenants")


def test_tenants_load_in_knocks_shape_with_upsert_snapshot_and_quarantine(warehouse, tmp_path):
    text = (
        "id,name,plan,settings.branding.primary_color\n"
        "acme,Acme,pro,#ff0000\n"
        "globex,Globex,free,\n"
        " padded,Padded,pro,\n"
        ",Nameless,pro,\n"
    )
    result = load_source(warehouse, source(tmp_path, "tenants", text), T0)
    assert (result.users_inserted, result.rows_quarantined) == (2, 2)
    assert tenants(warehouse)["acme"] == {
        "name": "Acme",
        "plan": "pro",
        "settings": {"branding": {"primary_color": "#ff0000"}},
    }
    reasons = warehouse.execute(
        "select row_number, tenant_id, reason from raw.tenants_quarantine order by row_number"
    ).fetchall()
    assert reasons == [
        (3, " padded", "id has leading or trailing whitespace"),
        (4, None, "id is missing"),
    ]
    # The users' tables are untouched.
    assert warehouse.execute("select count(*) from raw.users").fetchone()[0] == 0
    # Reloading the same rows changes nothing; a snapshot without globex deletes it.
    again = load_source(warehouse, source(tmp_path, "tenants", text), T0 + timedelta(hours=1))
    assert (again.users_updated, again.rows_unchanged) == (0, 2)
    load_source(
        warehouse,
        source(tmp_path, "tenants", "id,name,plan\nacme,Acme,enterprise\n"),
        T0 + timedelta(hours=2),
    )
    assert tenants(warehouse) == {
        "acme": {
            "name": "Acme",
            "plan": "enterprise",
            "settings": {"branding": {"primary_color": "#ff0000"}},
        }
    }
    updated = dict(warehouse.execute("select tenant_id, updated_at from raw.tenants").fetchall())
    assert updated["acme"] == T0 + timedelta(hours=2)
    assert warehouse.execute(
        "select deleted_at from raw.tenants where tenant_id = 'globex'"
    ).fetchone()[0] == T0 + timedelta(hours=2)


def test_memberships_load_by_user_and_tenant_and_report_unknown_ones(warehouse, tmp_path):
    load_source(
        warehouse, source(tmp_path, "users", "id,name\nu1,Ann\nu2,Bob\n", name="users.csv"), T0
    )
    load_source(
        warehouse, source(tmp_path, "tenants", "id,name\nacme,Acme\n", name="tenants.csv"), T0
    )
    text = (
        "user_id,tenant_id,role\n"
        "u1,acme,admin\n"
        "u2,acme,viewer\n"
        "u1,ghost,admin\n"  # a tenant not loaded: kept, reported
        "nobody,acme,viewer\n"  # a user not loaded: kept, reported
        ",acme,viewer\n"
        "u2,acme,admin\n"  # the same pair again: a snapshot keeps the last row
    )
    result = load_source(warehouse, source(tmp_path, "tenant_memberships", text), T0)
    assert (result.users_inserted, result.rows_quarantined) == (4, 2)
    assert memberships(warehouse) == {
        ("u1", "acme"): {"role": "admin"},
        ("u2", "acme"): {"role": "admin"},
        ("u1", "ghost"): {"role": "admin"},
        ("nobody", "acme"): {"role": "viewer"},
    }
    reasons = warehouse.execute(
        "select row_number, user_id, tenant_id, reason from raw.tenant_memberships_quarantine "
        "order by row_number"
    ).fetchall()
    assert reasons[0] == (2, "u2", "acme", reasons[0][3]) and "duplicate" in reasons[0][3]
    assert reasons[1] == (5, None, "acme", "user_id is missing")
    assert missing_memberships(warehouse) == {
        "memberships_missing_user": 1,
        "memberships_missing_tenant": 1,
    }
    # the users asset's report names them, by user and tenant
    assert missing_memberships_report(warehouse) == (
        "tenant memberships kept but not evaluated: 1 name a user and 1 a tenant that is not "
        "loaded: 'nobody' in 'acme' (no such user), 'u1' in 'ghost' (no such tenant)"
    )
    # A stream source updates one membership's properties; null removes one.
    stream = source(
        tmp_path,
        "tenant_memberships",
        '{"user_id": "u1", "tenant_id": "acme", "role": "owner", "seat": 3}\n'
        '{"user_id": "u1", "tenant_id": "acme", "seat": null}\n',
        mode="stream",
        name="seats.jsonl",
        fmt="jsonl",
    )
    load_source(warehouse, stream, T0 + timedelta(hours=1))
    assert memberships(warehouse)[("u1", "acme")] == {"role": "owner"}


def test_membership_source_without_tenant_id_column_is_a_clear_error(warehouse, tmp_path):
    with pytest.raises(SourceError, match=r"no `tenant_id` column .*'rows'"):
        load_source(warehouse, source(tmp_path, "tenant_memberships", "user_id,role\nu1,x\n"), T0)


def test_api_tenant_writes_reach_the_warehouse_at_the_next_load(warehouse, tmp_path):
    store = MembershipStore(f"sqlite:///{tmp_path / 'store.db'}")
    store.create()
    with store.engine.begin() as connection:
        set_tenants(
            store, connection, [("acme", {"name": "Acme", "plan": "pro", "tier": {"a": 1}})]
        )
        set_tenants(
            store, connection, [("acme", {"tier": {"a": None, "b": 2}, "channel_data": {}})]
        )
        set_tenants(store, connection, [("gone", {"name": "Gone"})])
    with store.engine.begin() as connection:
        assert delete_tenant(connection, "gone")
    result = load_tenant_queue(warehouse, store, T0)
    assert result.users_inserted == 2 and result.users_deleted == 1
    assert tenants(warehouse) == {"acme": {"name": "Acme", "plan": "pro", "tier": {"b": 2}}}
    # Applied once: the queue is marked loaded.
    assert load_tenant_queue(warehouse, store, T0 + timedelta(hours=1)).rows_read == 0
