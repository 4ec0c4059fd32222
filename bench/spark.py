"""Benchmark: the same audiences on DuckDB and on local Apache Spark, in the same run.

    .venv/bin/python bench/spark.py --users 20000     # writes bench/spark-results.md and .json

The synthetic users of bench/synthetic.py (typed fields, lists, nested objects, missing and null
properties, 0.5% deleted) are generated into a DuckDB file under bench/data/spark-<users>/, with
the 50 synthetic audience definitions. Both dbt projects are copied there and generated from those
definitions. Then, one after the other:

1. DuckDB, cold: `dbt build` of the DuckDB project (dbt-duckdb), as the `audience_models` asset
   runs it, at the synthetic evaluation time; then warm: the same build an hour later (no user
   changed: DuckDB's incremental models re-evaluate only the users "now" moved over).
2. Spark, cold: `dbt run` of the Spark project (dbt-spark's session mode, Spark inside the dbt
   process, `local[2]`), the users loaded from a parquet export of raw.users first, the membership
   events published; then warm: the same run an hour later (Spark's models are full rebuilds: the
   whole table is evaluated again).
3. The member counts per audience on both engines must be equal (`dbt show` reads Spark's; the
   tests compare the members themselves).

Wall times include each tool's start-up (dbt's parse; Spark's JVM and metastore), which dominates
at small sizes; the ratio is Spark's wall time over DuckDB's, measured in the same run on the same
machine. The machine's load at the start is recorded: other work on a shared machine slows both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import synthetic  # noqa: E402

from audiences.dbt.project import generate, run_dbt  # noqa: E402
from audiences.dbt.spark import (  # noqa: E402
    SPARK_PROJECT_FOLDER,
    SparkRun,
    generate_spark_models,
    spark_project_dir,
    write_spark_models,
)
from audiences.settings import Settings  # noqa: E402

RESULTS_MD = BENCH / "spark-results.md"
RESULTS_JSON = BENCH / "spark-results.json"


def _prepare(folder: Path, users: int) -> Settings:
    from audiences.dbt.project import project_definitions
    from audiences.warehouse.queries import connect

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    definitions = folder / "audiences"
    synthetic.write_definitions(definitions)
    shutil.copytree(
        ROOT / "dbt_project",
        folder / "dbt_project",
        ignore=shutil.ignore_patterns("target", "logs", ".user.yml"),
    )
    shutil.rmtree(folder / "dbt_project" / "models" / "audiences" / "custom", ignore_errors=True)
    shutil.copytree(
        ROOT / SPARK_PROJECT_FOLDER,
        folder / SPARK_PROJECT_FOLDER,
        ignore=shutil.ignore_patterns("target", "logs", ".user.yml"),
    )
    settings = Settings.from_env(
        duckdb_path=str(folder / "warehouse.duckdb"),
        definitions_dir=str(definitions),
        dbt_project_dir=str(folder / "dbt_project"),
    )
    connection = connect(settings.duckdb_path)
    synthetic.generate_users(connection, users)
    connection.execute(
        "copy (select user_key, user_id, cast(properties as varchar) as properties, updated_at, "
        f"deleted_at from raw.users) to '{folder / 'users.parquet'}' (format parquet)"
    )
    connection.close()
    generate(settings)
    found = project_definitions(settings)
    write_spark_models(
        generate_spark_models(found.definitions, definitions.name),
        spark_project_dir(settings.dbt_project_dir),
    )
    return settings


def _timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    options = parser.parse_args()
    os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
    folder = BENCH / "data" / f"spark-{options.users}"
    started = datetime.now(UTC)
    load = os.getloadavg()
    settings = _prepare(folder, options.users)
    cold = datetime.fromisoformat(synthetic.EVALUATION_TIME.replace("Z", "+00:00"))
    warm = cold + timedelta(hours=1)

    def duckdb_build(moment: datetime):
        stamp = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
        return run_dbt(["build", "--vars", json.dumps({"evaluation_time": stamp})], settings)

    run_dbt(["parse"], settings)  # as `prepare` does when the code location loads
    duckdb_cold, _ = _timed(lambda: duckdb_build(cold))
    duckdb_warm, _ = _timed(lambda: duckdb_build(warm))

    spark = SparkRun(spark_project_dir(settings.dbt_project_dir), folder / "spark-warehouse")
    spark_cold, _ = _timed(lambda: spark.run(cold, folder / "users.parquet"))
    spark_warm, _ = _timed(lambda: spark.run(warm))

    import duckdb

    with duckdb.connect(str(settings.duckdb_path), read_only=True) as connection:
        duckdb_counts = dict(
            connection.execute(
                "select audience_key, count(*) from main.audience_members group by all"
            ).fetchall()
        )
    spark_counts = {
        row["audience_key"]: row["members"]
        for row in spark.query(
            "select audience_key, count(*) as members from audiences.audience_members group by audience_key"
        )
    }
    equal = duckdb_counts == spark_counts
    document = {
        "command": f"bench/spark.py --users {options.users}",
        "started": started.isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.1f} at start",
        "users": options.users,
        "audiences": len(duckdb_counts),
        "memberships": sum(duckdb_counts.values()),
        "members_equal": equal,
        "seconds": {
            "duckdb_cold": round(duckdb_cold, 1),
            "duckdb_warm": round(duckdb_warm, 1),
            "spark_cold": round(spark_cold, 1),
            "spark_warm": round(spark_warm, 1),
        },
        "ratio_cold": round(spark_cold / duckdb_cold, 1),
        "ratio_warm": round(spark_warm / duckdb_warm, 1),
    }
    RESULTS_JSON.write_text(json.dumps(document, indent=2) + "\n")
    s = document["seconds"]
    RESULTS_MD.write_text(
        f"""# DuckDB vs local Spark, same audiences, same run

`{document["command"]}` on {document["machine"]}, started {document["started"]}.
{options.users:,} synthetic users, {document["audiences"]} audiences, {document["memberships"]:,}
memberships. Member counts per audience equal on both engines: **{equal}**.

| | DuckDB (dbt-duckdb) | Spark local[2] (dbt-spark session) | Spark / DuckDB |
|---|---|---|---|
| cold (every user evaluated) | {s["duckdb_cold"]} s | {s["spark_cold"]} s | {document["ratio_cold"]}x |
| warm (an hour later, no user changed) | {s["duckdb_warm"]} s | {s["spark_warm"]} s | {document["ratio_warm"]}x |

Wall times of one dbt command each, start-up included (dbt's parse; for Spark the JVM, the Hive
metastore and the session). Spark's cold run also loads the users from parquet and publishes the
membership events; its warm run rebuilds every model (no incremental models on Spark yet), while
DuckDB's re-evaluates only the users "now" moved over. At this size the fixed costs dominate both:
the ratio says what a small deployment pays for Spark, not how the engines scale.
"""
    )
    print(RESULTS_MD.read_text())
    if not equal:
        raise SystemExit(f"members differ: duckdb {duckdb_counts} spark {spark_counts}")


if __name__ == "__main__":
    main()
