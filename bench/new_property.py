"""What a definition that reads one new property costs `int_users_flattened`, against a cold build.

    .venv/bin/python bench/new_property.py --users 1000000

Generates the synthetic users (bench/synthetic.py) into a DuckDB file under bench/data/new-property-<size>/
(kept, and reused with `--reuse`), copies the repo's dbt project there, and writes the benchmark's
50 audiences. Then, each a real `dbt build --select int_users_flattened`:

1. cold: no table yet, every user's JSON extracted for the 76 attribute columns;
2. added: one more audience reading `recipient.name`, a property no other audience reads: its
   columns are added to every row in place (the model's pre-hook, audiences/dbt/flattened.py),
   no row rewritten;
3. removed: that audience gone again: its columns dropped.

Beside them, in the same run, the floor of an extraction: one JSON parse of every user
(`json_valid(properties)` over `raw.users`). Times are dbt's own for the model (run_results.json,
`execution_time`), the command's wall time and the dbt process's CPU seconds (user + system: on a
shared machine, what the load disturbs least; it includes dbt's start-up and parse). Writes bench/new-property-results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import synthetic  # noqa: E402

NEW_AUDIENCE = {
    "name": "Named Smith",
    "type": "dynamic",
    "description": "Reads recipient.name, which no other benchmark audience reads.",
    "segments": [
        {
            "conditions": [
                {"property": "recipient.name", "operator": "contains", "argument": "Smith"}
            ]
        }
    ],
}


def dbt_build(folder: Path, definitions: Path, warehouse: Path) -> dict:
    """`audiences generate` then `dbt build --select int_users_flattened`: wall and model time."""
    environment = {
        **os.environ,
        "AUDIENCES_DUCKDB": str(warehouse),
        "AUDIENCES_DBT_PROJECT": str(folder / "dbt_project"),
        "AUDIENCES_DEFINITIONS": str(definitions),
    }
    audiences = str(Path(sys.executable).parent / "audiences")
    subprocess.run([audiences, "generate"], env=environment, check=True, capture_output=True)
    dbt = str(Path(sys.executable).parent / "dbt")
    project = str(folder / "dbt_project")
    start = time.perf_counter()
    cpu = _children_cpu()
    result = subprocess.run(
        [
            dbt,
            "build",
            "--select",
            "stg_warehouse__users",
            "int_users_flattened",
            "--project-dir",
            project,
            "--profiles-dir",
            project,
        ],
        env=environment,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    cpu = _children_cpu() - cpu
    if result.returncode:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-2000:])
    results = json.loads((folder / "dbt_project" / "target" / "run_results.json").read_text())
    model = next(r for r in results["results"] if r["unique_id"].endswith(".int_users_flattened"))
    return {
        "wall_s": round(wall, 2),
        "model_s": round(model["execution_time"], 2),
        "cpu_s": round(cpu, 2),
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parse_floor(warehouse: Path) -> dict:
    import duckdb

    with duckdb.connect(str(warehouse), read_only=True) as connection:
        start, cpu = time.perf_counter(), time.process_time()
        connection.execute(
            "select count(*) filter (where json_valid(properties)) from raw.users"
        ).fetchall()
        return {
            "wall_s": round(time.perf_counter() - start, 2),
            "cpu_s": round(time.process_time() - cpu, 2),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--reuse", action="store_true", help="keep the generated users")
    arguments = parser.parse_args()
    import duckdb

    folder = BENCH / "data" / f"new-property-{arguments.users}"
    warehouse = folder / "warehouse.duckdb"
    folder.mkdir(parents=True, exist_ok=True)
    if not (arguments.reuse and warehouse.exists()):
        warehouse.unlink(missing_ok=True)
        with duckdb.connect(str(warehouse)) as connection:
            synthetic.generate_users(connection, arguments.users)
    with duckdb.connect(str(warehouse)) as connection:
        connection.execute("drop table if exists main.int_users_flattened")
        connection.execute("drop table if exists main.int_users_flattened__covered")
    shutil.rmtree(folder / "dbt_project", ignore_errors=True)
    shutil.copytree(
        ROOT / "dbt_project",
        folder / "dbt_project",
        ignore=shutil.ignore_patterns("target", "logs", "*.duckdb"),
    )
    definitions = folder / "audiences"
    shutil.rmtree(definitions, ignore_errors=True)
    synthetic.write_definitions(definitions)

    load = os.getloadavg()[0]
    rows = {"floor: one JSON parse of every user": parse_floor(warehouse)}
    rows["cold build (76 columns)"] = dbt_build(folder, definitions, warehouse)
    (definitions / "named-smith").mkdir()
    (definitions / "named-smith" / "audience.json").write_text(json.dumps(NEW_AUDIENCE))
    rows["one new property added (recipient.name: 3 columns)"] = dbt_build(
        folder, definitions, warehouse
    )
    shutil.rmtree(definitions / "named-smith")
    rows["that property removed again"] = dbt_build(folder, definitions, warehouse)
    cold = rows["cold build (76 columns)"]["model_s"]
    lines = [
        "# int_users_flattened: a new property against a cold build",
        "",
        f"`.venv/bin/python bench/new_property.py --users {arguments.users}`, "
        f"{arguments.users:,} users, load average {load:.1f} at the start (2 cores, shared).",
        "",
        "| step | model (dbt) s | of cold | wall s | CPU s | of cold |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    cold_cpu = rows["cold build (76 columns)"]["cpu_s"]
    for name, row in rows.items():
        model = row.get("model_s")
        share = f"{model / cold:.0%}" if model is not None else ""
        lines.append(
            f"| {name} | {model if model is not None else ''} | {share} | {row['wall_s']} "
            f"| {row['cpu_s']} | {row['cpu_s'] / cold_cpu:.0%} |"
        )
    (BENCH / "new-property-results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
