"""Benchmark: a promotion dry run of 50 changed audiences against a production of N users.

    .venv/bin/python bench/promotion_impact.py --users 1000000   # writes bench/promotion-impact-results.md

Synthetic users (bench/synthetic.py) are generated into `raw.users` of a warehouse under
bench/data/promotion-<N>/, the 50 synthetic audiences are evaluated there by a real `dbt build`
(a copy of the engine's dbt project), and that warehouse is the production environment
(`AUDIENCES_DUCKDB_PRODUCTION`, `AUDIENCES_DEFINITIONS_PRODUCTION`). Then every audience is
changed (its first segment loses its last condition, or gains `recipient.plan exists` when it has
one condition) and `audiences.lifecycle.impact.impact` computes, per audience, the members now
and after, entered and exited with samples, and the deliveries per trigger: what
`audiences promote --dry-run` prints. Each timing is one run on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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

    before = {
        path.parent.name: json.loads(path.read_text())
        for path in sorted(definitions.glob("*/audience.json"))
    }
    after = {key: changed(definition) for key, definition in before.items()}
    start = time.perf_counter()
    result = impact(settings, "production", before, after)
    seconds = time.perf_counter() - start
    moved = sum(a.entered + a.exited for a in result.audiences)
    held = sum(a.would_hold for a in result.audiences)
    lines = [
        "# Promotion dry run: impact of 50 changed audiences",
        "",
        f"`.venv/bin/python bench/promotion_impact.py --users {arguments.users}`, one run, load "
        f"average {os.getloadavg()[0]:.1f} on a shared 2-core machine.",
        "",
        "| users | audiences | dry run | users entering or exiting | would hold | set-up: generate, dbt build |",
        "|---|---|---|---|---|---|",
        f"| {result.users:,} | {len(result.audiences)} | **{seconds:.2f} s** | {moved:,} | {held} | "
        + (f"{generated:.1f} s, {built:.1f} s |" if built is not None else "reused |"),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    (BENCH / "promotion-impact-results.md").write_text(text)


if __name__ == "__main__":
    main()
