"""Benchmark of dynamic audiences per tenant (issue 18), through the pipeline's own dbt build.

    .venv/bin/python bench/tenants.py                     # 1M users, 200k tenants (the issue's size)
    .venv/bin/python bench/tenants.py --users 100000      # a reduced run, on a shared machine

Data (generated, reproducible): `--users` users, `--users / 5` tenants (Knock's tenant shape:
name, plan, seats, trial_ends_at), 1.5 memberships a user on average (half the users belong to
two tenants) with a `role`, and 10 per-tenant audiences over `recipient.*`, `tenant.*` and
`membership.*`. Everything runs through the engine's own code:

1. **Load**: users, tenants and memberships written as Parquet files and loaded by
   `audiences.users.load_source` (the `users` asset's loader: validation, upsert, quarantine).
2. **First build**: the models `audiences generate` writes for the 10 audiences, in a copy of the
   engine's dbt project, built by dbt (`dbt run`), and the membership diff (`record_changes`).
3. **A first re-evaluation with nothing changed** (it fills the typed tables of the tenants'
   timestamps, once), then **a change to 1% of tenants** (their plan and trial end), loaded as a stream source; then the
   pipeline's re-evaluation (`dbt run` of the models a run rebuilds while the definitions are
   unchanged, `REEVALUATED_MODELS`): `audience_members` re-evaluates only the pairs of the
   changed tenants; and the diff.
4. **A full evaluation in the same run**: `audience_members` rebuilt with `--full-refresh` (every
   pair of every audience, what a run cost before the pair-incremental build), whose members
   must equal the incremental build's.

The times compared are dbt's own for the `audience_members` model (`target/run_results.json`),
beside each command's wall time (which includes dbt's start, 3-5 s). Results go to
`bench/tenants-results-<users>.md` and `.json`; data to `bench/data/tenants/` (ignored).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402

from audiences.dbt.project import generate, prepare, run_dbt  # noqa: E402
from audiences.membership.changes import record_changes  # noqa: E402
from audiences.settings import Settings  # noqa: E402
from audiences.users import load_source  # noqa: E402
from audiences.users.sources import UserSource  # noqa: E402
from audiences.warehouse.evaluation import set_evaluation_clock  # noqa: E402
from pipelines.defs.audiences import REEVALUATED_MODELS  # noqa: E402

NOW = datetime(2026, 11, 1, tzinfo=UTC)
DATA = ROOT / "bench" / "data" / "tenants"


def condition(prop: str, operator: str, argument=None) -> dict:
    found = {"property": prop, "operator": operator}
    if argument is not None:
        found["argument"] = argument
    return found


AUDIENCES = {
    "trial-admins-this-week": [
        condition("tenant.plan", "equal_to", "trial"),
        condition("tenant.trial_ends_at", "is_timestamp_on_or_after_now"),
        condition("tenant.trial_ends_at", "is_timestamp_before", "7 days from now"),
        condition("membership.role", "equal_to", "admin"),
    ],
    "pro-workspace-editors": [
        condition("tenant.plan", "equal_to", "pro"),
        condition("membership.role", "contains", "edit"),
    ],
    "big-workspace-admins": [
        condition("tenant.seats", "greater_than_or_equal_to", "50"),
        condition("membership.role", "equal_to", "admin"),
    ],
    "enterprise-viewers-on-free": [
        condition("tenant.plan", "equal_to", "enterprise"),
        condition("recipient.plan", "equal_to", "free"),
    ],
    "trial-members-inactive": [
        condition("tenant.plan", "equal_to", "trial"),
        condition("recipient.last_seen_at", "is_timestamp_before", "14 days ago"),
    ],
    "small-paid-workspaces": [
        condition("tenant.plan", "not_equal_to", "free"),
        condition("tenant.seats", "is_between", "[1, 5]"),
    ],
    "admins-eu": [
        condition("tenant.region", "equal_to", "EU"),
        condition("membership.role", "equal_to", "admin"),
    ],
    "named-workspaces-a": [condition("tenant.name", "contains", "a1")],
    "pro-users-in-trials": [
        condition("recipient.plan", "equal_to", "pro"),
        condition("tenant.plan", "equal_to", "trial"),
    ],
    "owners-of-new-seats": [
        condition("membership.seat", "greater_than", "90"),
        condition("tenant.plan", "exists"),
    ],
}


def write_sources(users: int, tenants: int, folder: Path) -> dict[str, Path]:
    """Users, tenants and memberships as Parquet files, generated in SQL (reproducible)."""
    paths = {name: folder / f"{name}.parquet" for name in ("users", "tenants", "memberships")}
    with duckdb.connect() as connection:
        connection.execute(
            f"""
            copy (
                select 'u' || i as id,
                    case when i % 3 = 0 then 'pro' else 'free' end as plan,
                    (timestamp '2026-11-01' - to_minutes(cast((i * 7919) % 86400 as bigint)))::varchar
                        as last_seen_at
                from range({users}) as t(i)
            ) to '{paths["users"]}' (format parquet)
            """
        )
        connection.execute(
            f"""
            copy (
                select 't' || i as id,
                    'Workspace ' || i as name,
                    ['free', 'trial', 'pro', 'enterprise'][1 + (i * 31) % 4] as plan,
                    1 + (i * 17) % 100 as seats,
                    (timestamp '2026-11-01' + to_hours(cast((i * 13) % 720 - 120 as bigint)))::varchar
                        as trial_ends_at,
                    ['EU', 'US', 'APAC'][1 + i % 3] as region
                from range({tenants}) as t(i)
            ) to '{paths["tenants"]}' (format parquet)
            """
        )
        connection.execute(
            f"""
            copy (
                select 'u' || i as user_id, 't' || ((i * 7) % {tenants}) as tenant_id,
                    ['admin', 'editor', 'viewer', 'viewer'][1 + i % 4] as role, i % 100 as seat
                from range({users}) as t(i)
                union all
                select 'u' || i, 't' || ((i * 7 + 1 + i % 97) % {tenants}),
                    ['viewer', 'editor'][1 + i % 2], (i * 3) % 100
                from range({users}) as t(i)
                where i % 2 = 0
            ) to '{paths["memberships"]}' (format parquet)
            """
        )
    return paths


def write_definitions(folder: Path) -> None:
    """The 10 per-tenant audiences in Knock's CLI layout."""
    for key, conditions in AUDIENCES.items():
        (folder / key).mkdir(parents=True)
        document = {
            "name": key,
            "type": "dynamic",
            "tenancy": "per_tenant",
            "segments": [{"conditions": conditions}],
        }
        (folder / key / "audience.json").write_text(json.dumps(document))


def timed(action) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def dbt(arguments: list[str], settings: Settings) -> tuple[float, float]:
    """Run dbt; its wall time and the `audience_members` model's own time."""
    seconds, _ = timed(lambda: run_dbt(arguments, settings))
    run_results = json.loads((settings.dbt_project_dir / "target" / "run_results.json").read_text())
    model = next(
        result["execution_time"]
        for result in run_results["results"]
        if result["unique_id"].endswith(".audience_members")
    )
    return round(seconds, 2), round(model, 2)


def members(connection) -> set:
    return set(
        connection.execute(
            "select audience_key, user_key, tenant from main.audience_members"
        ).fetchall()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--changed-share", type=float, default=0.01)
    arguments = parser.parse_args()
    users, tenants = arguments.users, arguments.users // 5
    folder = DATA / str(users)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    results: dict = {"users": users, "tenants": tenants, "audiences": len(AUDIENCES)}
    paths = write_sources(users, tenants, folder)
    project = folder / "dbt_project"
    shutil.copytree(
        ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs", "*.duckdb")
    )
    shutil.rmtree(project / "models" / "audiences" / "custom")
    write_definitions(folder / "audiences")
    warehouse = folder / "warehouse.duckdb"
    settings = Settings.from_env(
        {}, duckdb_path=warehouse, definitions_dir=folder / "audiences", dbt_project_dir=project
    )
    generate(settings)
    prepare(settings)

    connection = duckdb.connect(str(warehouse))
    connection.execute("set TimeZone = 'UTC'")
    at = datetime(2026, 10, 31, tzinfo=UTC)
    for kind, name in (
        ("users", "users"),
        ("tenants", "tenants"),
        ("tenant_memberships", "memberships"),
    ):
        source = UserSource(name, "parquet", paths[name], "snapshot", kind=kind)
        seconds, loaded = timed(lambda source=source: load_source(connection, source, at))
        results[f"load_{name}_s"] = round(seconds, 2)
        results[f"{name}_loaded"] = loaded.users_inserted
    results["memberships"] = connection.execute(
        "select count(*) from raw.tenant_memberships"
    ).fetchone()[0]
    set_evaluation_clock(connection, NOW)
    connection.close()

    results["first_build_s"], results["first_build_members_s"] = dbt(["run"], settings)
    with duckdb.connect(str(warehouse)) as connection:
        seconds, _ = timed(lambda: record_changes(connection, NOW))
        results["first_diff_s"] = round(seconds, 2)
        results["members_before"] = len(members(connection))

    # The first re-evaluation (nothing changed, "now" 5 minutes later): it fills the typed tables
    # of the tenants' timestamps once (audiences/dbt/tenants.py), as every run after a full build's
    # first does; the measured re-evaluation below is then a steady run's.
    with duckdb.connect(str(warehouse)) as connection:
        set_evaluation_clock(connection, NOW + timedelta(minutes=5))
    results["settle_build_s"], results["settle_members_s"] = dbt(
        ["run", "--select", *REEVALUATED_MODELS], settings
    )
    with duckdb.connect(str(warehouse)) as connection:
        record_changes(connection, NOW + timedelta(minutes=5))

    # A change to 1% of tenants: their plan and trial end, loaded as a stream source.
    changed = max(1, int(tenants * arguments.changed_share))
    change = folder / "tenant_changes.parquet"
    later = NOW + timedelta(minutes=15)
    with duckdb.connect(str(warehouse)) as connection:
        connection.execute(
            f"""
            copy (
                select 't' || (i * {tenants // changed}) as id,
                    ['trial', 'pro', 'enterprise', 'free'][1 + i % 4] as plan,
                    '2026-11-03T00:00:00Z' as trial_ends_at
                from range({changed}) as t(i)
            ) to '{change}' (format parquet)
            """
        )
        source = UserSource("tenant_changes", "parquet", change, "stream", kind="tenants")
        seconds, loaded = timed(lambda: load_source(connection, source, later))
        results["changed_tenants"] = loaded.users_updated
        results["load_tenant_change_s"] = round(seconds, 2)
        results["pairs_of_changed_tenants"] = connection.execute(
            "select count(*) from raw.tenant_memberships where deleted_at is null and tenant_id in "
            "(select tenant_id from raw.tenants where updated_at = $later)",
            {"later": later},
        ).fetchone()[0]
        set_evaluation_clock(connection, later)

    # The pipeline's re-evaluation: the models a run rebuilds while the definitions are unchanged.
    results["incremental_build_s"], results["incremental_members_s"] = dbt(
        ["run", "--select", *REEVALUATED_MODELS], settings
    )
    with duckdb.connect(str(warehouse)) as connection:
        results["users_reevaluated"] = connection.execute(
            "select count(distinct user_key) from main.audience_members__reevaluated "
            "where audience_key is not null and user_key is not null"
        ).fetchone()[0]
        results["evaluated_whole"] = connection.execute(
            "select count(*) from main.audience_members__reevaluated where user_key is null"
        ).fetchone()[0]
        seconds, summary = timed(lambda: record_changes(connection, later))
        results["incremental_diff_s"] = round(seconds, 2)
        results["moved_pairs"] = summary.entered + summary.exited
        incremental = members(connection)

    # A full evaluation in the same run, of the same data: every pair of every audience.
    results["full_build_s"], results["full_members_s"] = dbt(
        ["run", "--full-refresh", "--select", "audience_members"], settings
    )
    with duckdb.connect(str(warehouse)) as connection:
        full = members(connection)
    assert incremental == full, "the incremental build's members differ from a full evaluation"
    results["members_after"] = len(full)
    write_results(results)


def write_results(results: dict) -> None:
    name = f"tenants-results-{results['users']}"
    (ROOT / "bench" / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    ratio = results["full_members_s"] / max(results["incremental_members_s"], 0.001)
    lines = [
        f"# Per-tenant audiences: {results['users']:,} users in {results['tenants']:,} tenants",
        "",
        f"`.venv/bin/python bench/tenants.py --users {results['users']}` ({results['memberships']:,} "
        f"memberships, {results['audiences']} per-tenant audiences; 2-core machine shared with "
        "other work, so times are upper bounds). `audience_members` is dbt's own time for that "
        "model; a command's wall time includes dbt's start.",
        "",
        "| step | wall seconds | `audience_members` seconds |",
        "|---|---|---|",
        f"| load users, tenants, memberships (snapshots) | {results['load_users_s']}, "
        f"{results['load_tenants_s']}, {results['load_memberships_s']} | |",
        f"| first build, `dbt run` ({results['members_before']:,} member pairs) | "
        f"{results['first_build_s']} | {results['first_build_members_s']} |",
        f"| first membership diff | {results['first_diff_s']} | |",
        f"| first re-evaluation, nothing changed (fills the typed tables of tenants' timestamps "
        f"once) | {results['settle_build_s']} | {results['settle_members_s']} |",
        f"| load a change to {results['changed_tenants']:,} tenants (1%, stream; "
        f"{results['pairs_of_changed_tenants']:,} pairs) | {results['load_tenant_change_s']} | |",
        f"| incremental build (`dbt run --select` the re-evaluated models): "
        f"{results['users_reevaluated']:,} users' pairs re-evaluated, "
        f"{results['evaluated_whole']} audiences whole | {results['incremental_build_s']} | "
        f"{results['incremental_members_s']} |",
        f"| its membership diff ({results['moved_pairs']:,} pairs moved) | "
        f"{results['incremental_diff_s']} | |",
        f"| full evaluation, same run (`--full-refresh`): every pair | {results['full_build_s']} | "
        f"{results['full_members_s']} |",
        "",
        f"The incremental `audience_members` after a change to 1% of tenants took {ratio:.1f}x less "
        "time than a full evaluation of the same data, and gave the same members (checked).",
        "",
    ]
    (ROOT / "bench" / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
