"""The whole graph materialized by Dagster on a temporary DuckDB, checked against the reference.

The session's `sample_run` is the main job (`audiences run`) on the sample data in `data/`. Its
members must be exactly what the independent reference evaluator computes from the same users.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime

import dagster as dg
import duckdb
import pytest
import sqlalchemy as sa
from condition_harness import NOW, ROOT, copy_sample_run, copy_store

from audiences.conditions.definitions import evaluation_order, load_definitions
from audiences.conditions.reference import evaluate_audience, evaluate_pairs
from pipelines import build_definitions

pytestmark = pytest.mark.slow


def reference_members(
    connection, now=NOW, definitions_dir=ROOT / "data" / "audiences"
) -> dict[str, set[str]]:
    users = [
        {"id": user_id, **json.loads(properties)}
        for user_id, properties in connection.execute(
            "select user_id, properties from raw.users where deleted_at is null"
        ).fetchall()
    ]
    definitions = load_definitions(definitions_dir)
    events_by_user = sample_events_by_user()
    members: dict[str, set] = {}
    for key in evaluation_order(definitions):
        definition = definitions[key]
        if definition.per_tenant:
            # Members are (user, tenant) pairs: the memberships whose user and tenant exist.
            tenants = [
                {"id": tenant_id, **json.loads(properties)}
                for tenant_id, properties in connection.execute(
                    "select tenant_id, properties from raw.tenants where deleted_at is null"
                ).fetchall()
            ]
            memberships = [
                {"user_id": user_id, "tenant_id": tenant_id, **json.loads(properties)}
                for user_id, tenant_id, properties in connection.execute(
                    "select user_id, tenant_id, properties from raw.tenant_memberships "
                    "where deleted_at is null"
                ).fetchall()
            ]
            members[key] = evaluate_pairs(definition.raw, users, tenants, memberships, now=now)
            continue
        if definition.type != "dynamic":
            # Static members come from data/syncs.yml (sources/vip_accounts.csv): identified users only.
            members[key] = {
                uid
                for (uid,) in connection.execute(
                    "select distinct user_id from raw.static_audience_members where audience_key = $k "
                    "and user_id in (select user_id from raw.users where deleted_at is null)",
                    {"k": key},
                ).fetchall()
            }
            continue
        members[key] = {
            user["id"]
            for user in users
            if evaluate_audience(
                definition.raw,
                user,
                now=now,
                is_member=lambda other, uid: uid in members[other],
                events=events_by_user.get(user["id"], []),
            )
        }
    return members


def sample_events_by_user() -> dict[object, list[dict]]:
    """The sample's tracked events (data/sources/events.jsonl) as written, in arrival order, by
    `userId`: the reference evaluator reads them raw (its own dedupe and validity rules). A line
    that is not a JSON object is no event at all."""
    by_user: dict[object, list[dict]] = {}
    for line in (ROOT / "data" / "sources" / "events.jsonl").read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("userId"), str):
            by_user.setdefault(event["userId"], []).append(event)
    return by_user


def compiled_members(connection) -> dict[str, set]:
    """audience_members by audience; it must hold one row per (audience, user, tenant): an
    incremental build that left a replaced row behind would repeat one. A per-tenant audience's
    members are (user id, tenant) pairs."""
    rows = connection.execute(
        "select members.audience_key, users.user_id, members.tenant from main.audience_members as members "
        "join raw.users as users using (user_key)"
    ).fetchall()
    assert len(rows) == len(set(rows)), "audience_members repeats a member"
    per_tenant = {
        key
        for key, definition in load_definitions(ROOT / "data" / "audiences").items()
        if definition.per_tenant
    }
    members: dict[str, set] = {}
    for key, user_id, tenant in rows:
        members.setdefault(key, set()).add((user_id, tenant) if key in per_tenant else user_id)
    return members


def test_sample_run_members_equal_the_reference_evaluator(sample_run):
    with duckdb.connect(str(sample_run), read_only=True) as connection:
        expected = reference_members(connection)
        actual = compiled_members(connection)
    for key, ids in expected.items():
        assert actual.get(key, set()) == ids, key
    assert all(len(ids) > 0 for ids in expected.values())
    assert expected["vip-customers"] == {"user_00042", "user_00107", "user_00311"}
    # The hand-written SQL audience is evaluated beside the defined ones.
    assert set(actual) == {key for key, ids in expected.items() if ids} | {"high_value_accounts"}
    assert 0 < len(actual["high_value_accounts"]) < 2964


def test_sample_run_records_users_quarantine_and_evaluation_time(sample_run):
    with duckdb.connect(str(sample_run), read_only=True) as connection:
        users, quarantined = connection.execute(
            "select (select count(*) from raw.users where deleted_at is null), (select count(*) from raw.users_quarantine)"
        ).fetchone()
        evaluations = connection.execute(
            "select audience_key, strftime(evaluated_at, '%Y-%m-%dT%H:%M:%SZ') from main.audience_evaluations"
        ).fetchall()
        registry = connection.execute("select count(*) from raw.audience_registry").fetchone()[0]
    # 26 bad rows, and the first row of each of the ten ids that the snapshot holds twice
    assert (users, quarantined) == (2964, 26 + 10)
    assert len(evaluations) == 19 and {time for _, time in evaluations} == {"2026-11-01T00:00:00Z"}
    assert registry == 18


def test_reevaluation_moves_users_as_time_passes_and_reports_counts(
    sample_run, tmp_path, monkeypatch
):
    copy = tmp_path / "warehouse.duckdb"
    copy_sample_run(sample_run, tmp_path)
    monkeypatch.setenv("AUDIENCES_DUCKDB", str(copy))
    monkeypatch.setenv("AUDIENCES_SINKS", str(tmp_path / "sinks.yml"))
    defs = build_definitions()
    later = "2026-11-27T00:00:00+00:00"
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("reevaluate_audiences").execute_in_process(
            run_config={"ops": {"audience_models": {"config": {"evaluation_time": later}}}},
            instance=instance,
        )
    assert result.success
    materializations = {
        event.asset_key.to_user_string(): event.step_materialization_data.materialization.metadata
        for event in result.get_asset_materialization_events()
    }
    # The definitions did not change: the audience views were not rebuilt, their members were
    # re-evaluated, and each audience is materialized with them.
    assert (
        materializations["audiences/eu_customers"]["status"].value
        == "members re-evaluated (view unchanged)"
    )
    assert materializations["audiences/new_signups_this_week"]["member_count"].value == 0
    assert materializations["audiences/eu_customers"]["member_count"].value > 0
    assert materializations["audience_members"]["member_counts"].value["eu_customers"] > 0
    checks = {
        evaluation.check_name: evaluation.passed
        for evaluation in result.get_asset_check_evaluations()
    }
    assert checks["every_audience_built"] is True
    assert checks["no_mass_membership_change"] is True
    # Time passing alone moves users: last week's sign-ups leave, and their exits are events.
    changes = materializations["membership_changes"]
    assert changes["exited"].value > 0
    assert "| new-signups-this-week | 0 | 80 |" in changes["changes_per_audience"].value
    assert materializations["published_membership_events"]["events_published"].value == (
        changes["entered"].value + changes["exited"].value
    )
    delivered = materializations["workflow_trigger_deliveries"]["delivered"].value
    lines = (tmp_path / "out" / "triggers.jsonl").read_text().splitlines()
    assert delivered == len(lines) > 0
    assert {json.loads(line)["data"]["event"] for line in lines} <= {"entered", "exited"}
    with duckdb.connect(str(copy), read_only=True) as connection:
        history = connection.execute(
            "select count(distinct evaluated_at), count(*) from main.audience_evaluations"
        ).fetchone()
        signups = connection.execute(
            "select member_count from main.audience_evaluations where audience_key = 'new-signups-this-week' "
            "order by evaluated_at"
        ).fetchall()
    assert history == (2, 38)  # 19 audiences evaluated twice
    assert signups[0][0] > 0 and signups[1][0] == 0
    # Re-evaluated incrementally (time-relative audiences only for users near their windows), the
    # members are still exactly what the reference evaluator computes at the new time.
    with duckdb.connect(str(copy), read_only=True) as connection:
        expected = reference_members(connection, now=datetime.fromisoformat(later))
        actual = compiled_members(connection)
        reevaluated, changed = connection.execute(
            "select count(*), count(*) filter (where changed) from main.int_users_to_reevaluate"
        ).fetchone()
    assert {key: ids for key, ids in actual.items() if key != "high_value_accounts"} == {
        key: ids for key, ids in expected.items() if ids
    }
    assert 0 < reevaluated < 2964  # 26 days of windows cover most of the sample's users
    assert changed == 0  # no user's data changed: the schedule tick's path


def test_a_broken_trigger_file_holds_the_events_not_the_evaluation(
    sample_run, tmp_path, monkeypatch
):
    """A typo in one trigger.json used to fail the run before any audience was evaluated. Now
    the audiences are evaluated, their events wait in the outbox (none published without its
    triggers, none lost), and the run after the fix publishes them with every trigger."""
    from audiences.store.database import MembershipStore, membership_events

    copy = tmp_path / "warehouse.duckdb"
    copy_sample_run(sample_run, tmp_path)
    workflows = tmp_path / "workflows"
    shutil.copytree(ROOT / "data" / "workflows", workflows)
    broken = workflows / "churn-risk-exit" / "trigger.json"
    good = broken.read_text()
    broken.write_text(good.replace('"exited"', '"exitted"'))
    monkeypatch.setenv("AUDIENCES_DUCKDB", str(copy))
    monkeypatch.setenv("AUDIENCES_SINKS", str(tmp_path / "sinks.yml"))
    monkeypatch.setenv("AUDIENCES_WORKFLOWS", str(workflows))
    defs = build_definitions()
    job = defs.resolve_job_def("reevaluate_audiences")

    def reevaluate(at: str):
        with dg.DagsterInstance.ephemeral() as instance:
            return job.execute_in_process(
                run_config={"ops": {"audience_models": {"config": {"evaluation_time": at}}}},
                instance=instance,
                raise_on_error=False,
            )

    def outbox() -> tuple[int, int]:
        with duckdb.connect(str(copy), read_only=True) as connection:
            return connection.execute(
                "select (select max(published_sequence) from raw.outbox_published), "
                "(select max(sequence) from raw.membership_outbox)"
            ).fetchone()

    published_before, written_before = outbox()
    result = reevaluate("2026-11-27T00:00:00+00:00")
    assert not result.success
    failures = [event for event in result.all_events if event.event_type_value == "STEP_FAILURE"]
    assert [event.step_key for event in failures] == ["published_membership_events"]
    assert f"{broken}: $.on" in failures[0].step_failure_data.user_failure_data.description
    materialized = {
        event.asset_key.to_user_string() for event in result.get_asset_materialization_events()
    }
    assert {"audience_definitions", "audience_members", "membership_changes"} <= materialized
    # Evaluated at the new time, with its events written and held.
    published, written = outbox()
    assert published == published_before and written > written_before
    with duckdb.connect(str(copy), read_only=True) as connection:
        assert (
            connection.execute(
                "select count(*) from main.audience_evaluations "
                "where evaluated_at = '2026-11-27 00:00:00+00'"
            ).fetchone()[0]
            > 0
        )
    # Fixed: the next run publishes everything waiting, once, with the triggers.
    broken.write_text(good)
    assert reevaluate("2026-11-28T00:00:00+00:00").success
    published, written = outbox()
    assert published == written
    with duckdb.connect(str(copy), read_only=True) as connection:
        held = {
            row[0]
            for row in connection.execute(
                "select event_id from raw.membership_outbox where not is_backfill "
                "and sequence > $before",
                {"before": written_before},
            ).fetchall()
        }
    store = MembershipStore(f"sqlite:///{tmp_path / 'store.sqlite'}")
    stored = [row["event_id"] for row in store.rows(sa.select(membership_events.c.event_id))]
    store.dispose()
    assert held and held <= set(stored) and len(stored) == len(set(stored))
    exits = [
        json.loads(line)
        for line in (tmp_path / "out" / "triggers.jsonl").read_text().splitlines()
        if json.loads(line)["workflow_key"] == "churn-risk-exit"
    ]
    assert all(line["data"]["event"] == "exited" for line in exits)


def test_a_reevaluation_writes_none_of_dbts_json_artifacts(sample_run, dbt_project_copy, tmp_path):
    """Issue 25: a re-evaluation (the dbt project unchanged since the last full build) runs dbt
    without writing its manifest, graph and run results, whose writing grows with the number of
    audiences (two manifest writes, ~8 s of CPU each, at 2,000). The members are still the
    reference evaluator's."""
    from audiences.dbt.project import run_dbt
    from audiences.settings import Settings
    from audiences.warehouse.evaluation import set_evaluation_clock
    from pipelines.defs.audiences import evaluation_arguments

    copy = tmp_path / "warehouse.duckdb"
    copy_sample_run(sample_run, tmp_path)
    settings = Settings.from_env(
        {},
        duckdb_path=copy,
        dbt_project_dir=dbt_project_copy,
        definitions_dir=ROOT / "data" / "audiences",
    )
    artifacts = ("manifest.json", "run_results.json", "graph.gpickle")
    target = dbt_project_copy / "target"

    def written() -> dict[str, int | None]:
        return {
            name: (target / name).stat().st_mtime_ns if (target / name).exists() else None
            for name in artifacts
        }

    before = written()
    later = datetime.fromisoformat("2026-11-27T00:00:00+00:00")
    with duckdb.connect(str(copy)) as connection:
        set_evaluation_clock(connection, later)
    run_dbt(evaluation_arguments(lean=True, state=None), settings)
    assert written() == before
    with duckdb.connect(str(copy), read_only=True) as connection:
        expected = reference_members(connection, now=later)
        actual = compiled_members(connection)
    assert {key: ids for key, ids in actual.items() if key != "high_value_accounts"} == {
        key: ids for key, ids in expected.items() if ids
    }


def test_a_run_over_a_subset_of_the_dbt_assets_hands_dbt_a_bounded_selection(
    sample_run, tmp_path, monkeypatch
):
    """Issue 25: a Dagster run that selects a subset of the dbt assets (here every audience and the
    evaluation, without the catalog) hands dbt a selection whose
    size does not grow with the number of audiences: the audience views by their tag, not one
    selector per model (dagster-dbt's own subset selection: 2,009 selectors at 2,000 audiences,
    998 s of dbt). The selected audiences are materialized, and their members are still the
    reference evaluator's."""
    copy = tmp_path / "warehouse.duckdb"
    copy_sample_run(sample_run, tmp_path)
    monkeypatch.setenv("AUDIENCES_DUCKDB", str(copy))
    monkeypatch.setenv("AUDIENCES_SINKS", str(tmp_path / "sinks.yml"))
    defs = build_definitions()
    [models] = [
        assets
        for assets in defs.assets
        if isinstance(assets, dg.AssetsDefinition) and assets.op.name == "audience_models"
    ]
    audiences = {key for key in models.keys if key.path[0] == "audiences"}
    later = "2026-11-27T00:00:00+00:00"
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("reevaluate_audiences").execute_in_process(
            run_config={"ops": {"audience_models": {"config": {"evaluation_time": later}}}},
            instance=instance,
            asset_selection=[
                dg.AssetKey("audience_definitions"),
                *(models.keys - {dg.AssetKey("audience_catalog")}),
            ],
        )
        assert result.success
        commands = [
            entry.user_message.split("`")[1].split()
            for entry in instance.all_logs(result.run_id)
            if entry.user_message.startswith("Running dbt command: `")
        ]
    [command] = commands
    # dbt orders the build's tests in time linear in its graph (the default way walks every
    # audience view's siblings for each: ~4 s of CPU per run at 2,000 audiences)
    assert "--use-fast-test-edges" in command
    selected = command[command.index("--select") + 1 :]
    selected = selected[: next((i for i, a in enumerate(selected) if a.startswith("--")), None)]
    assert "tag:audience" in selected
    # Nothing in the selection names an audience: its size is that of the engine's own models
    # and tests, whatever the number of audiences.
    assert not [item for item in selected if any(key.path[-1] in item for key in audiences)]
    assert len(selected) <= len(models.keys - audiences) + len(list(models.check_specs)) + 1
    materialized = {event.asset_key for event in result.get_asset_materialization_events()}
    assert audiences | {dg.AssetKey("audience_members")} <= materialized
    with duckdb.connect(str(copy), read_only=True) as connection:
        expected = reference_members(connection, now=datetime.fromisoformat(later))
        actual = compiled_members(connection)
    assert {key: ids for key, ids in actual.items() if key != "high_value_accounts"} == {
        key: ids for key, ids in expected.items() if ids
    }


def test_incremental_members_equal_a_full_evaluation_after_data_and_definition_changes(
    sample_run, tmp_path, dagster_home
):
    """Changed, new and deleted users, "now" moved, and one definition changed, in one run.

    audience_members re-evaluates per user what it can (macros/audience_members.sql); the result
    must equal the reference evaluator's full evaluation, and the diff must see every change."""
    from audiences import cli
    from audiences.dbt.project import run_dbt
    from audiences.settings import Settings

    copy = tmp_path / "warehouse.duckdb"
    copy_sample_run(sample_run, tmp_path)
    project = tmp_path / "dbt_project"
    shutil.copytree(
        ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs", "*.duckdb")
    )
    definitions = tmp_path / "audiences"
    shutil.copytree(ROOT / "data" / "audiences", definitions)
    changed = json.loads((definitions / "eu-customers" / "audience.json").read_text())
    changed["segments"][0]["conditions"][0]["argument"] = '["DE", "FR", "NL"]'
    (definitions / "eu-customers" / "audience.json").write_text(json.dumps(changed))
    # beta-invite-candidates reads power-users: a change there must re-evaluate both whole.
    changed = json.loads((definitions / "power-users" / "audience.json").read_text())
    changed["segments"][1]["conditions"][0]["argument"] = "500"
    (definitions / "power-users" / "audience.json").write_text(json.dumps(changed))
    # The snapshot loses three users (deleted); a stream moves 40 users around and adds one.
    lines = (
        (ROOT / "data" / "sources" / "users.csv")
        .read_text(encoding="utf-8")
        .splitlines(keepends=True)
    )
    deleted = ["user_00030", "user_00031", "user_00032"]
    kept = [
        line for line in lines if not line.startswith(tuple(f"{user_id}," for user_id in deleted))
    ]
    assert len(kept) == len(lines) - 3
    (tmp_path / "users.csv").write_text("".join(kept), encoding="utf-8")
    updates = [
        {
            "id": f"user_{n:05d}",
            "plan": plan,
            "address": {"country": country},
            "nps_score": score,
            "last_seen_at": seen,
        }
        for n, (plan, country, score, seen) in enumerate(
            [
                ("enterprise", "DE", 10, "2026-11-20T00:00:00Z"),
                ("free", "US", 2, "2026-09-01T00:00:00Z"),
                ("pro", "FR", None, "2026-11-26T12:00:00Z"),
                ("starter", "NL", 6, None),
            ]
            * 10,
            start=100,
        )
    ]
    updates.append(
        {
            "id": "user_new_1",
            "plan": "enterprise",
            "address": {"country": "DE"},
            "nps_score": 9,
            "last_seen_at": "2026-11-26T00:00:00Z",
        }
    )
    (tmp_path / "updates.jsonl").write_text(
        "".join(json.dumps(update) + "\n" for update in updates)
    )
    (tmp_path / "sources.yml").write_text(
        "sources:\n"
        "  - {name: crm_export, path: users.csv, mode: snapshot}\n"
        f"  - {{name: product_updates, path: '{ROOT / 'data' / 'sources' / 'user_updates.parquet'}', mode: stream}}\n"
        "  - {name: test_updates, path: updates.jsonl, mode: stream}\n"
    )
    later = "2026-11-01T06:00:00+00:00"
    code = cli.main(
        [
            "--duckdb",
            str(copy),
            "--sinks",
            str(tmp_path / "sinks.yml"),
            "--store",
            f"sqlite:///{tmp_path / 'store.sqlite'}",
            "--sources",
            str(tmp_path / "sources.yml"),
            "--definitions",
            str(definitions),
            "--dbt-project",
            str(project),
            "--evaluation-time",
            later,
            "run",
        ]
    )
    assert code == 0
    with duckdb.connect(str(copy), read_only=True) as connection:
        expected = reference_members(
            connection, now=datetime.fromisoformat(later), definitions_dir=definitions
        )
        actual = compiled_members(connection)
        reevaluated = {
            key
            for (key,) in connection.execute(
                "select user_id from main.int_users_to_reevaluate join raw.users using (user_key)"
            ).fetchall()
        }
        moved = dict(
            connection.execute(
                "select audience_key, count(*) from raw.membership_outbox where occurred_at = $t group by all",
                {"t": datetime.fromisoformat(later)},
            ).fetchall()
        )
        gone = connection.execute(
            "select count(*) from raw.users where deleted_at is not null and user_id in "
            "('user_00030', 'user_00031', 'user_00032')"
        ).fetchone()[0]
        unconsumed = connection.execute(
            "select count(*) from main.audience_members__reevaluated"
        ).fetchone()[0]
        intervals = connection.execute(
            "select audience_key, user_id, tenant from raw.membership_intervals "
            "where exited_at is null"
        ).fetchall()
    assert {key: ids for key, ids in actual.items() if key != "high_value_accounts"} == {
        key: ids for key, ids in expected.items() if ids
    }
    assert {user["id"] for user in updates} | set(deleted) <= reevaluated
    # Also re-evaluated: users with a timestamp in a six-hour window. Not everyone. (Users that the
    # snapshot and the stream both set, re-applied on each run, end as they were: not re-evaluated.)
    assert len(reevaluated) < 2964 / 4
    # The diff saw every change: the open intervals are the new members, and the log is consumed.
    opened: dict[str, set[str]] = {}
    per_tenant = {
        key for key, definition in load_definitions(definitions).items() if definition.per_tenant
    }
    for key, user_id, tenant in intervals:
        opened.setdefault(key, set()).add((user_id, tenant) if key in per_tenant else user_id)
    assert {
        key: ids
        for key, ids in opened.items()
        if key not in ("vip-customers", "high_value_accounts")
    } == {
        key: ids
        for key, ids in actual.items()
        if key not in ("vip-customers", "high_value_accounts")
    }
    assert moved.get("eu-customers", 0) > 0 and moved.get("churn-risk", 0) > 0
    assert moved.get("power-users", 0) > 0 and moved.get("beta-invite-candidates", 0) > 0
    assert unconsumed == 0 and gone == 3
    # Deleted users have no attribute row, whether the build replaced their rows or, with
    # --full-refresh, made the table anew from users that include their tombstones.
    settings = Settings.from_env(
        {}, duckdb_path=copy, dbt_project_dir=project, definitions_dir=definitions
    )
    deleted_rows = (
        "select count(*) from main.int_users_flattened where user_id in "
        "('user_00030', 'user_00031', 'user_00032')"
    )
    for arguments in ([], ["run", "--full-refresh", "--select", "int_users_flattened"]):
        if arguments:
            run_dbt(arguments, settings)
        with duckdb.connect(str(copy), read_only=True) as connection:
            users, rows = connection.execute(
                "select count(*), count(distinct user_key) from main.int_users_flattened"
            ).fetchone()
            live = connection.execute(
                "select count(*) from raw.users where deleted_at is null"
            ).fetchone()[0]
            assert connection.execute(deleted_rows).fetchone()[0] == 0 and users == rows == live

    # One more definition changes: dbt compares the project with the manifest this warehouse was
    # last built from and rebuilds that audience's view, not the others.
    from audiences.dbt.project import build_state, generate, project_fingerprint

    assert build_state(project, project_fingerprint(project)) is not None
    changed = json.loads((definitions / "eu-customers" / "audience.json").read_text())
    changed["segments"][0]["conditions"][0]["argument"] = '["DE", "FR", "NL", "IT"]'
    (definitions / "eu-customers" / "audience.json").write_text(json.dumps(changed))
    generate(settings)
    latest = "2026-11-01T07:00:00+00:00"
    started = time.time()
    code = cli.main(
        [
            "--duckdb",
            str(copy),
            "--sinks",
            str(tmp_path / "sinks.yml"),
            "--store",
            f"sqlite:///{tmp_path / 'store.sqlite'}",
            "--sources",
            str(tmp_path / "sources.yml"),
            "--definitions",
            str(definitions),
            "--dbt-project",
            str(project),
            "--evaluation-time",
            latest,
            "run",
        ]
    )
    assert code == 0
    # What dbt built, as the run reports it (the build writes no run_results.json: `LEAN_FLAGS`):
    # a view dbt built has dbt's materialization, one it left as it was only its members
    # ("members re-evaluated (view unchanged)").
    unchanged = "members re-evaluated (view unchanged)"
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        [run] = instance.get_runs(limit=1)
        records = instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
        ).records
    materialized = {
        record.event_log_entry.dagster_event.asset_key.path[-1]: (
            record.event_log_entry.dagster_event.step_materialization_data.materialization.metadata
        )
        for record in records
    }
    status = {
        model: materialized[model].get("status")
        for model in (
            "eu_customers",
            "audience_members",
            "power_users",
            "churn_risk",
            "beta_invite_candidates",
        )
    }
    # (dbt's own materializations say how its node ended: "success")
    built = {model for model, value in status.items() if value != dg.MetadataValue.text(unchanged)}
    assert built == {"eu_customers", "audience_members"}, status
    assert status["eu_customers"] == dg.MetadataValue.text("success"), status
    # ... and it wrote none of dbt's JSON into its target folder (`target/<run>/`; 15 MB and ~5 s
    # of CPU at 2,000 audiences): the next change's state is `dbt parse`'s manifest.
    written = [
        path
        for name in ("manifest.json", "run_results.json")
        for path in (project / "target").glob(f"*/{name}")
        if path.stat().st_mtime >= started
    ]
    assert written == [], written
    assert build_state(project, project_fingerprint(project)) is not None
    with duckdb.connect(str(copy), read_only=True) as connection:
        expected = reference_members(
            connection, now=datetime.fromisoformat(latest), definitions_dir=definitions
        )
        actual = compiled_members(connection)
    assert {key: ids for key, ids in actual.items() if key != "high_value_accounts"} == {
        key: ids for key, ids in expected.items() if ids
    }


def test_uploads_dropped_in_the_folder_become_static_members_in_the_warehouse(
    sample_run, tmp_path, monkeypatch
):
    shutil.copy(sample_run, tmp_path / "warehouse.duckdb")
    copy_store(sample_run.parent / "store.sqlite", tmp_path / "store.sqlite")
    shutil.copytree(ROOT / "data" / "audiences", tmp_path / "audiences")
    (tmp_path / "uploads" / "vip-customers").mkdir(parents=True)
    (tmp_path / "uploads" / "vip-customers" / "vips.csv").write_text(
        "id,tenant_id,tier\nuser_00042,acme,gold\nuser_00042,globex,gold\nbrand-new-user,,silver\n ,x,y\n"
    )
    monkeypatch.setenv("AUDIENCES_DUCKDB", str(tmp_path / "warehouse.duckdb"))
    monkeypatch.setenv("AUDIENCES_DEFINITIONS", str(tmp_path / "audiences"))
    monkeypatch.setenv(
        "AUDIENCES_USERS_SOURCE", str(ROOT / "data" / "sources" / "user_updates.parquet")
    )
    monkeypatch.setenv("AUDIENCES_SOURCE_MODE", "stream")
    with dg.DagsterInstance.ephemeral() as instance:
        result = (
            build_definitions()
            .resolve_job_def("audiences_job")
            .execute_in_process(
                run_config={
                    "ops": {
                        "audience_models": {
                            "config": {"evaluation_time": "2026-11-01T00:00:00+00:00"}
                        }
                    }
                },
                instance=instance,
            )
        )
    assert result.success
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as connection:
        static = connection.execute(
            "select user_id, tenant from audiences.vip_customers order by user_id, tenant"
        ).fetchall()
        new_user = connection.execute(
            "select properties ->> '$.tier' from raw.users where user_id = 'brand-new-user'"
        ).fetchall()
    # The upload's members beside the sample sync's (user_00042 under acme and globex is in both).
    assert static == [
        ("brand-new-user", None),
        ("user_00042", "acme"),
        ("user_00042", "globex"),
        ("user_00107", "acme"),
        ("user_00311", None),
    ]
    assert new_user == [("silver",)]
    processed = sorted(
        p.name for p in (tmp_path / "uploads" / "vip-customers" / "processed").iterdir()
    )
    assert len(processed) == 2 and any(name.endswith(".rejects.csv") for name in processed)


def test_partial_dbt_builds_between_a_load_and_an_evaluation_skip_no_user(sample_run, tmp_path):
    """An analyst runs `dbt build --select audience_members` (say, after editing a custom audience),
    then `dbt build --select int_users_to_reevaluate audience_members`, between a load and the next
    evaluation. The next evaluation must still re-evaluate the users that load changed, with their
    new attributes: the watermark audience_members records is what int_users_to_reevaluate covered,
    and that never goes past what int_users_flattened has extracted. The build of audience_members
    alone re-evaluates the users of the last list again: it reads them from the end of
    int_users_flattened after that list's own lower bound, not after the watermark it moved."""

    from audiences.dbt.project import prepare, run_dbt
    from audiences.settings import Settings
    from audiences.users import load_source
    from audiences.users.sources import UserSource
    from pipelines.defs.audiences import UNCHANGED_WHEN_DEFINITIONS_ARE

    copy = tmp_path / "warehouse.duckdb"
    shutil.copy(sample_run, copy)
    project = tmp_path / "dbt_project"
    shutil.copytree(
        ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs", "*.duckdb")
    )
    settings = Settings.from_env(
        {}, duckdb_path=copy, dbt_project_dir=project, definitions_dir=ROOT / "data" / "audiences"
    )
    prepare(settings)
    with duckdb.connect(str(copy), read_only=True) as connection:
        (now,) = connection.execute("select max(evaluated_at) from raw.evaluation_clock").fetchone()
        before = compiled_members(connection)
    # A first load and evaluation, so that the list of users to re-evaluate is not empty when an
    # analyst's build of audience_members alone re-evaluates it again.
    for load, batch in enumerate((range(300, 330), range(200, 230))):
        updates = [
            {
                "id": f"user_{n:05d}",
                "plan": "enterprise",
                "address": {"country": "DE"},
                "nps_score": 10,
                "last_seen_at": "2026-10-31T12:00:00Z",
                "mrr": 5000,
            }
            for n in batch
        ]
        (tmp_path / "updates.jsonl").write_text(
            "".join(json.dumps(update) + "\n" for update in updates)
        )
        with duckdb.connect(str(copy)) as connection:
            load_source(
                connection,
                UserSource("test_updates", "jsonl", tmp_path / "updates.jsonl", mode="stream"),
                datetime.now(UTC),
            )
        if load == 0:
            run_dbt(["build", "--exclude", " ".join(UNCHANGED_WHEN_DEFINITIONS_ARE)], settings)
    run_dbt(
        ["build", "--select", "audience_members"], settings
    )  # int_users_to_reevaluate is not rebuilt
    run_dbt(
        ["build", "--select", "int_users_to_reevaluate", "audience_members"], settings
    )  # nor the attributes
    run_dbt(
        ["build", "--exclude", " ".join(UNCHANGED_WHEN_DEFINITIONS_ARE)], settings
    )  # the next evaluation
    with duckdb.connect(str(copy), read_only=True) as connection:
        expected = reference_members(connection, now=now)
        actual = compiled_members(connection)
    assert actual != before  # the updates moved users
    assert {key: ids for key, ids in actual.items() if key != "high_value_accounts"} == {
        key: ids for key, ids in expected.items() if ids
    }


def test_a_broken_definition_is_skipped_with_its_members_kept_while_the_others_are_evaluated(
    sample_run, tmp_path, capsys, monkeypatch
):
    """Issue 13, item 3: one audience.json with an unknown operator, and one audience that refers to
    it, in the second run (after the sample run). The others are evaluated and move; the two keep
    their members, open memberships and catalog entry, get no event, and the run exits 1 naming
    file and JSON path. Fixed, the third run evaluates them again, whole."""
    from audiences import cli

    monkeypatch.chdir(ROOT)
    for name in [name for name in os.environ if name.startswith("AUDIENCES_")]:
        monkeypatch.delenv(name)
    copy = tmp_path / "warehouse.duckdb"
    copy_sample_run(sample_run, tmp_path)
    project = tmp_path / "dbt_project"
    shutil.copytree(
        ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs", "*.duckdb")
    )
    definitions = tmp_path / "audiences"
    shutil.copytree(ROOT / "data" / "audiences", definitions)
    broken_file = definitions / "power-users" / "audience.json"
    good_text = broken_file.read_text(encoding="utf-8")
    broken = json.loads(good_text)
    broken["segments"][0]["conditions"][0]["operator"] = "equals"
    broken_file.write_text(json.dumps(broken, indent=2), encoding="utf-8")
    skipped = ("power-users", "beta-invite-candidates")  # beta-invite-candidates reads power-users
    flags = [
        "--duckdb",
        str(copy),
        "--sinks",
        str(tmp_path / "sinks.yml"),
        "--store",
        f"sqlite:///{tmp_path / 'store.sqlite'}",
        "--definitions",
        str(definitions),
        "--dbt-project",
        str(project),
    ]

    def state(connection, key):
        members = sorted(
            connection.execute(
                "select user_key, tenant from main.audience_members where audience_key = $k",
                {"k": key},
            ).fetchall()
        )
        intervals = sorted(
            connection.execute(
                "select user_id, entry_number, entered_at from raw.membership_intervals "
                "where audience_key = $k and exited_at is null",
                {"k": key},
            ).fetchall()
        )
        return members, intervals

    with duckdb.connect(str(copy), read_only=True) as connection:
        before = {key: state(connection, key) for key in skipped}
    assert all(members and intervals for members, intervals in before.values())

    def run_process(*arguments):
        # A process per run, as a user runs it: what it prints is what they see, and its Dagster
        # reads the dbt manifest afresh (one process caches it by path).
        environment = {
            name: value for name, value in os.environ.items() if not name.startswith("AUDIENCES_")
        }
        done = subprocess.run(
            [sys.executable, "-m", "audiences.cli", *flags, *arguments],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return done.returncode, done.stdout, done.stderr

    later = "2026-11-27T00:00:00+00:00"  # 26 days: power users not seen for 3 days would leave
    code, out, err = run_process("--evaluation-time", later, "run")
    assert code == 1, err
    assert f"{broken_file}: $.segments[0].conditions[0].operator: unknown operator 'equals'" in err
    assert (
        f"{definitions / 'beta-invite-candidates' / 'audience.json'}: $.segments[0].conditions[0].argument: "
        "refers to audience 'power-users', which is skipped"
    ) in err
    assert "skipped 2 audiences" in err and "Traceback" not in out + err
    assert "new-signups-this-week" in out  # the run's summary of the evaluated audiences
    at = datetime.fromisoformat(later)
    with duckdb.connect(str(copy), read_only=True) as connection:
        after = {key: state(connection, key) for key in skipped}
        expected = reference_members(
            connection, now=at, definitions_dir=ROOT / "data" / "audiences"
        )
        actual = compiled_members(connection)
        moved = dict(
            connection.execute(
                "select audience_key, count(*) from raw.membership_outbox "
                "where occurred_at = $t group by all",
                {"t": at},
            ).fetchall()
        )
        catalog = dict(
            connection.execute(
                "select audience_key, is_skipped from main.audience_catalog"
            ).fetchall()
        )
        evaluated = {
            key
            for (key,) in connection.execute(
                "select audience_key from main.audience_evaluations where evaluated_at = $t",
                {"t": at},
            ).fetchall()
        }
    assert after == before  # the same members and open memberships: nobody left
    assert not set(skipped) & set(moved)  # and no event
    assert moved.get("new-signups-this-week", 0) > 0  # the others were evaluated, and moved
    for key, ids in expected.items():
        if key not in skipped:
            assert actual.get(key, set()) == ids, key
    assert {key for key, is_skipped in catalog.items() if is_skipped} == set(skipped)
    assert evaluated == set(catalog) - set(skipped)
    # The members of a skipped audience are still listed; preview and explain work for the
    # others, and name the problem for the skipped ones in one line.
    code = cli.main([*flags, "members", "power-users"])
    listed = capsys.readouterr().out.splitlines()
    assert code == 0 and len(listed) == len(before["power-users"][0])
    assert cli.main([*flags, "--evaluation-time", later, "preview", "eu-customers"]) == 0
    assert "matching users" in capsys.readouterr().out
    assert (
        cli.main([*flags, "--evaluation-time", later, "explain", "eu-customers", "user_00001"]) == 0
    )
    capsys.readouterr()
    assert cli.main([*flags, "preview", "power-users"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"error: {broken_file}: $.segments[0].conditions[0].operator: unknown operator 'equals'"
    )
    assert len(err.splitlines()) == 1
    assert cli.main([*flags, "explain", "beta-invite-candidates", "user_00001"]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and "refers to audience 'power-users', which is skipped" in err
    )

    # Fixed: the next run evaluates both again, whole (users changed meanwhile too), and their
    # members now leave with exit events.
    broken_file.write_text(good_text, encoding="utf-8")
    fixed = "2026-11-27T01:00:00+00:00"
    code, out, err = run_process("--evaluation-time", fixed, "run")
    assert code == 0, err
    at = datetime.fromisoformat(fixed)
    with duckdb.connect(str(copy), read_only=True) as connection:
        expected = reference_members(connection, now=at)
        actual = compiled_members(connection)
        moved = dict(
            connection.execute(
                "select audience_key, count(*) from raw.membership_outbox "
                "where occurred_at = $t and event_type = 'exited' group by all",
                {"t": at},
            ).fetchall()
        )
        skipped_now = connection.execute(
            "select count(*) from main.audience_catalog where is_skipped"
        ).fetchone()[0]
    for key in skipped:
        assert actual.get(key, set()) == expected[key], key
    assert moved.get("power-users", 0) > 0 and skipped_now == 0


def test_identify_calls_enter_audiences_at_the_next_scheduled_evaluation_and_stay(
    sample_run, tmp_path, monkeypatch
):
    """Issue 23: with `dg dev` running and no one typing `audiences run`, an identify call through
    the API that moves a user into an audience must produce `entered` at the next scheduled
    evaluation, and the main job that reads the sample's sources again must not put them back."""
    import sqlalchemy as sa

    from audiences.store.database import MembershipStore, membership_events
    from audiences.store.profiles import identify

    copy_sample_run(sample_run, tmp_path)
    monkeypatch.setenv("AUDIENCES_DUCKDB", str(tmp_path / "warehouse.duckdb"))
    monkeypatch.setenv("AUDIENCES_SINKS", str(tmp_path / "sinks.yml"))
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as connection:
        members = {
            user_id
            for (user_id,) in connection.execute(
                "select user_id from audiences.enterprise_admins"
            ).fetchall()
        }
        crm_users = [
            user_id
            for (user_id,) in connection.execute(
                "select user_id from raw.users where source_name = 'crm_export' and deleted_at is null "
                "order by user_id"
            ).fetchall()
            if user_id not in members
        ][:40]
    store = MembershipStore(f"sqlite:///{tmp_path / 'store.sqlite'}").create()
    with store.engine.begin() as connection:  # what `PUT /v1/users/{id}` does
        identify(
            store,
            connection,
            [
                (
                    user_id,
                    {"plan": "enterprise", "tags": ["admin"], "email": f"{user_id}@acme.test"},
                )
                for user_id in crm_users
            ],
        )

    def events(kind: str) -> set[str]:
        columns = membership_events.c
        return {
            row["user_id"]
            for row in store.rows(
                sa.select(columns.user_id).where(
                    columns.audience_key == "enterprise-admins", columns.event_type == kind
                )
            )
        }

    defs = build_definitions()
    tick = datetime.fromisoformat("2026-11-01T00:15:00+00:00")
    with dg.DagsterInstance.ephemeral() as instance:
        schedule = defs.resolve_schedule_def("reevaluate_every_15_minutes")
        [request] = schedule.evaluate_tick(
            dg.build_schedule_context(instance=instance, scheduled_execution_time=tick)
        ).run_requests
        result = defs.resolve_job_def(
            request.job_name or "reevaluate_audiences"
        ).execute_in_process(run_config=request.run_config, instance=instance, tags=request.tags)
        assert result.success
        assert events("entered") >= set(crm_users)
        # The main job reads crm_export's unchanged file again: the identifies stay, no one exits.
        result = defs.resolve_job_def("audiences_job").execute_in_process(
            run_config={
                "ops": {
                    "audience_models": {"config": {"evaluation_time": "2026-11-01T00:16:00+00:00"}}
                }
            },
            instance=instance,
        )
        assert result.success
    assert not events("exited") & set(crm_users)
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as connection:
        assert set(crm_users) <= {
            user_id
            for (user_id,) in connection.execute(
                "select user_id from audiences.enterprise_admins"
            ).fetchall()
        }
    store.dispose()
