"""Benchmark of dynamic audiences per tenant (issue 18), on one DuckDB file.

    .venv/bin/python bench/tenants.py                     # 1M users, 200k tenants (the issue's size)
    .venv/bin/python bench/tenants.py --users 100000      # a reduced run, on a shared machine

Data (generated, reproducible): `--users` users, `--users / 5` tenants (Knock's tenant shape:
name, plan, seats, trial_ends_at), 1.5 memberships a user on average (half the users belong to
two tenants) with a `role`, and 10 per-tenant audiences over `recipient.*`, `tenant.*` and
`membership.*`. Everything runs through the engine's own code:

1. **Load**: users, tenants and memberships written as Parquet files and loaded by
   `audiences.users.load_source` (the `users` asset's loader: validation, upsert, quarantine).
2. **Full evaluation**: the models `audiences generate` writes for the 10 audiences, rendered
   with Jinja as dbt renders them, over `int_users_flattened` built with the generator's own
   extraction (`flattened_columns`): every pair of every audience.
3. **A change to 1% of tenants** (their plan and trial end), loaded as a stream source; then
   (a) the same 10 models restricted to the pairs of the changed tenants (their memberships: what
   an incremental build re-evaluates), and (b) a full evaluation again, in the same run. The
   restricted result is checked against the full one on those tenants.

The engine's `audience_members` evaluates per-tenant audiences whole today (docs/architecture.md):
(b) is what a run costs now, (a) what re-evaluating only the changed pairs costs. Results go to
`bench/tenants-results-<users>.md` and `.json`; data to `bench/data/tenants/` (ignored).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402
import jinja2  # noqa: E402

from audiences.conditions.compiler import attributes_used, render, timestamp_literal  # noqa: E402
from audiences.conditions.definitions import parse_definition  # noqa: E402
from audiences.dbt.models import flattened_columns, generate_models  # noqa: E402
from audiences.users import load_source  # noqa: E402
from audiences.users.sources import UserSource  # noqa: E402

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


def models(sql_relations: dict[str, str]) -> dict[str, str]:
    """Each audience's model SQL, as `audiences generate` writes it and dbt renders it."""
    definitions = {
        key: parse_definition(
            {
                "name": key,
                "type": "dynamic",
                "tenancy": "per_tenant",
                "segments": [{"conditions": conditions}],
            },
            key,
            Path(key) / "audience.json",
        )
        for key, conditions in AUDIENCES.items()
    }
    files = {
        str(f.path): f.text for f in generate_models(definitions, ROOT / "dbt_project", "audiences")
    }
    environment = jinja2.Environment(extensions=["jinja2.ext.do"])
    rendered = {}
    for key, definition in definitions.items():
        template = files[f"models/audiences/dynamic/{definition.model_name}.sql"]
        rendered[key] = environment.from_string(template).render(
            ref=sql_relations.__getitem__,
            config=lambda **_: "",
            evaluation_time=lambda: render(timestamp_literal(NOW), pretty=False),
        )
    return rendered, definitions


def timed(action) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


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
    connection = duckdb.connect(str(folder / "warehouse.duckdb"))
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

    relations = {
        "int_users_flattened": "flattened",
        "stg_warehouse__tenants": "(select * from raw.tenants where deleted_at is null)",
        "stg_warehouse__tenant_memberships": "memberships_evaluated",
    }
    sql, definitions = models(relations)
    needed = sorted(
        {a for d in definitions.values() for a in attributes_used(d.segments)},
        key=lambda a: (a.path, a.variant),
    )
    extraction, columns = flattened_columns(needed)
    selected = ", ".join(["user_key", "user_id"] + [f"{s} as {n}" for _, s, n in columns])
    seconds, _ = timed(
        lambda: connection.execute(
            f"create or replace table flattened as select {selected} from (select user_key, "
            f"user_id, {extraction} as property_values from raw.users where deleted_at is null)"
        )
    )
    results["flatten_users_s"] = round(seconds, 2)

    def evaluate(memberships_sql: str) -> tuple[float, dict[str, set]]:
        connection.execute(
            f"create or replace temp view memberships_evaluated as {memberships_sql}"
        )
        members = {}
        started = time.perf_counter()
        for key, model in sql.items():
            members[key] = set(
                connection.execute(f"select user_id, tenant from ({model})").fetchall()
            )
        return time.perf_counter() - started, members

    all_memberships = "select * from raw.tenant_memberships where deleted_at is null"
    seconds, before = evaluate(all_memberships)
    results["full_evaluation_s"] = round(seconds, 2)
    results["members_before"] = sum(len(m) for m in before.values())

    # A change to 1% of tenants: their plan and trial end, loaded as a stream source.
    changed = max(1, int(tenants * arguments.changed_share))
    change = folder / "tenant_changes.parquet"
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
    seconds, loaded = timed(
        lambda: load_source(connection, source, datetime(2026, 11, 1, tzinfo=UTC))
    )
    results["changed_tenants"] = loaded.users_updated
    results["load_tenant_change_s"] = round(seconds, 2)
    changed_sql = (
        f"{all_memberships} and tenant_id in (select tenant_id from raw.tenants "
        "where updated_at = timestamptz '2026-11-01 00:00:00+00')"
    )
    results["pairs_of_changed_tenants"] = connection.execute(
        f"select count(*) from ({changed_sql})"
    ).fetchone()[0]
    seconds, partial = evaluate(changed_sql)
    results["changed_pairs_evaluation_s"] = round(seconds, 2)
    seconds, after = evaluate(all_memberships)
    results["full_evaluation_after_change_s"] = round(seconds, 2)
    changed_ids = {
        row[0]
        for row in connection.execute(
            "select tenant_id from raw.tenants where updated_at = timestamptz '2026-11-01 00:00:00+00'"
        ).fetchall()
    }
    for key in sql:
        assert partial[key] == {pair for pair in after[key] if pair[1] in changed_ids}, key
        assert {p for p in before[key] if p[1] not in changed_ids} == {
            p for p in after[key] if p[1] not in changed_ids
        }, key
    results["members_after"] = sum(len(m) for m in after.values())
    results["moved_pairs"] = sum(len(before[k] ^ after[k]) for k in sql)
    connection.close()
    write_results(results)


def write_results(results: dict) -> None:
    name = f"tenants-results-{results['users']}"
    (ROOT / "bench" / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    speedup = results["full_evaluation_after_change_s"] / max(
        results["changed_pairs_evaluation_s"], 0.001
    )
    lines = [
        f"# Per-tenant audiences: {results['users']:,} users in {results['tenants']:,} tenants",
        "",
        f"`.venv/bin/python bench/tenants.py --users {results['users']}` ({results['memberships']:,} "
        f"memberships, {results['audiences']} per-tenant audiences; 2-core machine shared with "
        "other work, so times are upper bounds).",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| load users (snapshot) | {results['load_users_s']} |",
        f"| load tenants (snapshot) | {results['load_tenants_s']} |",
        f"| load memberships (snapshot) | {results['load_memberships_s']} |",
        f"| flatten users' attributes | {results['flatten_users_s']} |",
        f"| full evaluation, 10 audiences ({results['members_before']:,} member pairs) | "
        f"{results['full_evaluation_s']} |",
        f"| load a change to {results['changed_tenants']:,} tenants (1%, stream) | "
        f"{results['load_tenant_change_s']} |",
        f"| re-evaluate only their {results['pairs_of_changed_tenants']:,} pairs | "
        f"{results['changed_pairs_evaluation_s']} |",
        f"| full evaluation again, same run ({results['moved_pairs']:,} pairs moved) | "
        f"{results['full_evaluation_after_change_s']} |",
        "",
        f"Re-evaluating the changed tenants' pairs is {speedup:.0f}x cheaper than a full evaluation "
        "here, and gives the same members for those tenants (checked). Today's `audience_members` "
        "evaluates per-tenant audiences whole (the last row is what a run costs); re-evaluating "
        "only the pairs whose user, tenant or membership changed is the follow-up this measures.",
        "",
    ]
    (ROOT / "bench" / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
