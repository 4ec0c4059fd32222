"""Benchmark: a promotion dry run of 50 changed audiences against a production of N users.

    .venv/bin/python bench/promotion_impact.py --users 1000000   # writes bench/promotion-impact-results.md

Synthetic users (bench/synthetic.py) are generated into `raw.users` of a warehouse under
bench/data/promotion-<N>/, the 50 synthetic audiences are evaluated there by a real `dbt build`
(a copy of the engine's dbt project), and that warehouse is the production environment
(`AUDIENCES_DUCKDB_PRODUCTION`, `AUDIENCES_DEFINITIONS_PRODUCTION`), and recorded by the diff
(`record_changes`: its members are then open membership intervals, which the dry run compares
with). Then every audience is
changed (its first segment loses its last condition, or gains `recipient.plan exists` when it has
one condition) and `audiences.lifecycle.impact.impact` computes, per audience, the members now
and after, entered and exited with samples, and the deliveries per trigger: what
`audiences promote --dry-run` prints. Each timing is one run on a shared 2-core machine, wall
and CPU seconds (the process's, all DuckDB threads), beside two floors measured in the same run:
the new definitions' conditions alone (each audience's matches counted, the compiler's SQL over
the same users) and reading the members now (the open intervals, grouped by user).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import synthetic

from audiences.settings import ENGINE_DBT_PROJECT, Settings

BENCH = Path(__file__).resolve().parent


def changed(definition: dict) -> dict:
    """The definition with its first segment narrowed or widened."""
    after = copy.deepcopy(definition)
    conditions = after["segments"][0]["conditions"]
    if len(conditions) > 1:
        conditions.pop()
    else:
        conditions.append({"property": "recipient.plan", "operator": "exists"})
    return after


def cpu_seconds() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def timed(work) -> tuple[object, float, float]:
    """The work's result, wall seconds and CPU seconds."""
    start, cpu = time.perf_counter(), cpu_seconds()
    result = work()
    return result, time.perf_counter() - start, cpu_seconds() - cpu


def floors(settings, after: dict) -> dict[str, tuple[float, float]]:
    """Wall and CPU seconds of the dry run's two unavoidable reads, over the same warehouse: every
    new definition's matching users counted (the compiler's conditions, one filtered branch each),
    and the open intervals of the changed audiences grouped by user."""
    from audiences.conditions.definitions import parse_definition
    from audiences.warehouse.queries import connect, matching_scan

    definitions = {
        key: parse_definition(document, key, Path(key) / "audience.json")
        for key, document in after.items()
    }
    keys = sorted(definitions)
    with connect(settings.duckdb_path, read_only=True) as connection:
        source, conditions = matching_scan(
            connection,
            [definitions[key] for key in keys],
            definitions,
            settings.evaluation_time,
        )
        branches = " union all ".join(
            f"select users.user_key from {source} where {condition}" for condition in conditions
        )
        _, wall, cpu = timed(
            lambda: connection.execute(f"select count(*) from ({branches})").fetchall()
        )
        found = {"conditions": (wall, cpu)}
        _, wall, cpu = timed(
            lambda: connection.execute(
                "select count(*) from (select user_key, count(*) from raw.membership_intervals "
                "where exited_at is null and list_contains($keys, audience_key) group by user_key)",
                {"keys": keys},
            ).fetchall()
        )
        found["members now"] = (wall, cpu)
    return found


def record_members(warehouse: Path) -> float | None:
    """Record the evaluation's members as open intervals (the diff the pipeline runs after dbt),
    unless they are; returns the seconds it took, or None."""
    from datetime import datetime

    from audiences.membership.changes import record_changes
    from audiences.warehouse.queries import connect, table_exists

    with connect(warehouse) as connection:
        if table_exists(connection, "raw.membership_intervals"):
            return None
        start = time.perf_counter()
        record_changes(
            connection, datetime.fromisoformat(synthetic.EVALUATION_TIME.replace("Z", "+00:00"))
        )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="measure again over the warehouse an earlier run of this size built (no set-up)",
    )
    arguments = parser.parse_args()
    folder = BENCH / "data" / f"promotion-{arguments.users}"
    definitions = folder / "audiences"
    project = folder / "dbt_project"
    warehouse = folder / "warehouse.duckdb"
    reuse = arguments.reuse and warehouse.exists()
    if not reuse:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        synthetic.write_definitions(definitions)
        shutil.copytree(
            ENGINE_DBT_PROJECT, project, ignore=shutil.ignore_patterns("target", "logs")
        )
        shutil.rmtree(project / "models" / "audiences" / "custom", ignore_errors=True)
    for name in [name for name in os.environ if name.startswith("AUDIENCES_")]:
        del os.environ[name]
    os.environ.update(
        {
            "AUDIENCES_DUCKDB_PRODUCTION": str(warehouse),
            "AUDIENCES_DEFINITIONS_PRODUCTION": str(definitions),
            "AUDIENCES_DBT_PROJECT_PRODUCTION": str(project),
            "AUDIENCES_DUCKDB": str(folder / "development.duckdb"),
            "AUDIENCES_DEFINITIONS": str(definitions),
            "AUDIENCES_DBT_PROJECT": str(project),
            "AUDIENCES_EVALUATION_TIME": synthetic.EVALUATION_TIME,
        }
    )
    settings = Settings.from_env(environment="production")

    from audiences.dbt.project import generate, prepare, run_dbt
    from audiences.lifecycle.impact import impact
    from audiences.warehouse.queries import connect

    generated = built = None
    if not reuse:
        start = time.perf_counter()
        with connect(warehouse) as connection:
            synthetic.generate_users(connection, arguments.users)
        generated = time.perf_counter() - start
        start = time.perf_counter()
        generate(
            settings
        )  # the copied project holds the engine's sample models: these replace them
        prepare(settings)
        run_dbt(
            ["build", "--vars", json.dumps({"evaluation_time": synthetic.EVALUATION_TIME})],
            settings,
        )
        built = time.perf_counter() - start
    recorded = record_members(warehouse)

    before = {
        path.parent.name: json.loads(path.read_text())
        for path in sorted(definitions.glob("*/audience.json"))
    }
    after = {key: changed(definition) for key, definition in before.items()}
    load = os.getloadavg()[0]
    result, seconds, cpu = timed(lambda: impact(settings, "production", before, after))
    measured = floors(settings, after)
    load = max(load, os.getloadavg()[0])
    moved = sum(a.entered + a.exited for a in result.audiences)
    held = sum(a.would_hold for a in result.audiences)
    members_now = sum(a.members_now for a in result.audiences)
    conditions_wall, conditions_cpu = measured["conditions"]
    now_wall, now_cpu = measured["members now"]
    set_up = (f"{generated:.1f} s, {built:.1f} s" if built is not None else "reused") + (
        f", diff {recorded:.1f} s" if recorded is not None else ""
    )
    row = (
        f"| {result.users:,} | {len(result.audiences)} | **{seconds:.2f} s** ({cpu:.2f} CPU s) "
        f"| {conditions_wall:.2f} s ({conditions_cpu:.2f}) | {now_wall:.2f} s ({now_cpu:.2f}) "
        f"| {seconds / (conditions_wall + now_wall):.2f} ({cpu / (conditions_cpu + now_cpu):.2f}) "
        f"| {members_now:,} | {moved:,} | {held} | {load:.1f} | {set_up} |"
    )
    results = BENCH / "promotion-impact-results.md"
    header = [
        "# Promotion dry run: impact of 50 changed audiences",
        "",
        "`.venv/bin/python bench/promotion_impact.py --users N` (one run per row, on a shared "
        "2-core machine). Wall seconds, CPU seconds in brackets (the process's, all DuckDB "
        "threads: less sensitive to the other processes' load). The floors are measured in the "
        "same run, right after it: the new definitions' conditions alone (each audience's "
        "matches counted) and reading the members now (open intervals grouped by user); the "
        "ratio is the dry run over their sum. Load: `uptime`'s one-minute average, the higher of "
        "before and after.",
        "",
        "| users | audiences | dry run | floor: conditions | floor: members now | ratio | members now | entering or exiting | would hold | load | set-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines = results.read_text().splitlines() if results.exists() else []
    kept = [
        line
        for line in lines
        if line.startswith("| ") and not line.startswith(("| users", f"| {result.users:,} |"))
    ]
    text = "\n".join(header + kept + [row, ""])
    print(row)
    results.write_text(text)


if __name__ == "__main__":
    main()
