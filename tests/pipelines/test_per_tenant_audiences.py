"""Per-tenant dynamic audiences through the whole pipeline on the sample data: the sample's
workspaces and memberships are loaded, `workspace-admins-trial-ending` is evaluated per (user,
workspace), a tenant written through the API's queue re-evaluates at the next run, and its
entered events, triggers, history and `members --at` carry the tenant."""

from __future__ import annotations

import json
import os
from datetime import datetime

import duckdb
import pytest
from condition_harness import ROOT, SAMPLE_TIME, copy_sample_run

from audiences import cli
from audiences.conditions.definitions import load_definitions
from audiences.membership.changes import members_at
from audiences.store.database import MembershipStore
from audiences.store.tenants import set_tenants
from audiences.users import missing_memberships
from audiences.warehouse.queries import WarehouseError, explain, preview

pytestmark = pytest.mark.slow

KEY = "workspace-admins-trial-ending"
# Admins of the two workspaces whose trial ends within 7 days of SAMPLE_TIME (tenants.csv).
FIRST_MEMBERS = {
    ("user_00001", "northloop"),
    ("user_00031", "northloop"),
    ("user_00019", "kestrel-labs"),
    ("user_00049", "kestrel-labs"),
}


def pairs(connection) -> set[tuple[str, str]]:
    return {
        tuple(row)
        for row in connection.execute(
            "select users.user_id, members.tenant from main.audience_members as members "
            "join raw.users as users using (user_key) where members.audience_key = $key",
            {"key": KEY},
        ).fetchall()
    }


def test_the_sample_evaluates_per_workspace_and_reports_unknown_members(sample_run):
    with duckdb.connect(str(sample_run), read_only=True) as connection:
        assert pairs(connection) == FIRST_MEMBERS
        tenants = connection.execute(
            "select count(*) from raw.tenants where deleted_at is null"
        ).fetchone()[0]
        # tenant_memberships.csv names user_99999, whom no source holds, and users whose rows
        # the users source quarantines (user_00011, user_00013 twice, user_00034): kept, reported.
        assert missing_memberships(connection) == {
            "memberships_missing_user": 5,
            "memberships_missing_tenant": 0,
        }
        kept = connection.execute(
            "select count(*) from raw.tenant_memberships where user_id = 'user_99999'"
        ).fetchone()[0]
        assert kept == 1
        definitions = load_definitions(ROOT / "data" / "audiences")
        definition = definitions[KEY]
        now = datetime.fromisoformat(SAMPLE_TIME.replace("Z", "+00:00"))
        everywhere = preview(connection, definition, definitions, now)
        northloop = preview(connection, definition, definitions, now, tenant="northloop")
        why = explain(connection, definition, definitions, "user_00001", now, tenant="northloop")
        with pytest.raises(WarehouseError, match="give the tenant"):
            explain(connection, definition, definitions, "user_00001", now)
        with pytest.raises(WarehouseError, match="not per tenant"):
            preview(connection, definitions["eu-customers"], definitions, now, tenant="northloop")
    assert tenants == 5
    assert everywhere.count == 4 and northloop.count == 2
    assert {(row["user_id"], row["tenant"]) for row in northloop.sample} == {
        pair for pair in FIRST_MEMBERS if pair[1] == "northloop"
    }
    assert why.is_member and why.tenant == "northloop"
    assert [verdict.condition["property"] for verdict in why.verdicts] == [
        "tenant.plan",
        "tenant.trial_ends_at",
        "tenant.trial_ends_at",
        "membership.role",
    ]
    assert why.verdicts[-1].value == '"admin"'  # the JSON value seen, as for recipient.*


def test_a_tenant_written_through_the_api_enters_its_admins_with_the_tenant(
    sample_run, dbt_project_copy, tmp_path, monkeypatch
):
    copy_sample_run(sample_run, tmp_path)
    for name in [name for name in os.environ if name.startswith("AUDIENCES_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(ROOT)
    store_url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    store = MembershipStore(store_url)
    with store.engine.begin() as connection:
        # Brightforge's trial now ends within the week: its admins enter, per workspace.
        set_tenants(store, connection, [("brightforge", {"trial_ends_at": "2026-11-04T12:00:00Z"})])
    store.dispose()
    monkeypatch.setenv("AUDIENCES_STORE_URL", store_url)
    later = "2026-11-02T00:00:00Z"
    code = cli.main(
        [
            "--duckdb",
            str(tmp_path / "warehouse.duckdb"),
            "--sinks",
            str(tmp_path / "sinks.yml"),
            "--dbt-project",
            str(dbt_project_copy),
            "--evaluation-time",
            later,
            "run",
        ]
    )
    assert code == 0
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as connection:
        now = pairs(connection)
        entered = connection.execute(
            "select user_id, tenant from raw.membership_outbox "
            "where audience_key = $key and event_type = 'entered' and not is_backfill",
            {"key": KEY},
        ).fetchall()
        at = members_at(connection, KEY, datetime.fromisoformat(later.replace("Z", "+00:00")))
        before = members_at(
            connection, KEY, datetime.fromisoformat(SAMPLE_TIME.replace("Z", "+00:00"))
        )
    brightforge = {("user_00043", "brightforge")}
    assert now == FIRST_MEMBERS | brightforge
    assert set(entered) == brightforge
    assert {(row["user_id"], row["tenant"]) for row in at} == FIRST_MEMBERS | brightforge
    assert {(row["user_id"], row["tenant"]) for row in before} == FIRST_MEMBERS
    triggers = [
        json.loads(line)
        for line in (tmp_path / "out" / "triggers.jsonl").read_text().splitlines()
        if json.loads(line)["workflow_key"] == "workspace-trial-ending"
    ]
    assert [(t["recipients"], t["tenant"]) for t in triggers] == [(["user_00043"], "brightforge")]
