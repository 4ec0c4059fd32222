"""Benchmark: the same audiences on DuckDB and on local Apache Spark, in the same run.

    .venv/bin/python bench/spark.py --users 20000     # adds its section to bench/spark-results.md

The synthetic users of bench/synthetic.py (typed fields, lists, nested objects, missing and null
properties, 0.5% deleted) are generated into a DuckDB file under bench/data/spark-<users>/, with
the 50 synthetic audience definitions. Both dbt projects are copied there and generated from those
definitions. Then four evaluations an hour apart, each first on DuckDB (`dbt build` of the DuckDB
project, as the `audience_models` asset runs it), then on Spark (`dbt run` of the Spark project,
dbt-spark's session mode, Spark inside the dbt process, `local[2]`, the users loaded from a
parquet export of raw.users first):

1. cold: every user evaluated;
2. warm, no user changed: only the users "now" moved over are re-evaluated;
3. warm, 1% of the users changed (bench/synthetic.py's touch), then 10%.

Spark's per-model times (dbt's run_results.json) and the users it re-evaluated show that warm work
follows the changed users. At the end the member counts per audience on both engines must be equal
(`dbt show` reads Spark's; the tests compare the members and the events themselves).

Wall times include each tool's start-up (dbt's parse; Spark's JVM and metastore), which dominates
at small sizes; the ratio is Spark's wall time over DuckDB's, measured in the same run on the same
machine. The machine's load at the start is recorded: other work on a shared machine slows both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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


# The warm evaluations: (hours after the cold one, users touched: 1 in `modulus`; 0 = none).
WARM_STEPS = ((1, 0), (2, 100), (3, 10))
# The models whose work an incremental build should scale with the changed users.
TIMED_MODELS = (
    "int_users_extracted",
    "int_users_flattened",
    "int_users_to_reevaluate",
    "int_users_to_evaluate",
    "audience_members",
    "membership_changes",
)


def _touch(settings: Settings, folder: Path, step: int, modulus: int) -> int:
    """Change 1 in `modulus` users in DuckDB's raw.users (bench/synthetic.py's touch, at `step`
    hours after the cold evaluation), export them for Spark; returns how many changed."""
    import duckdb

    touched = 0
    with duckdb.connect(str(settings.duckdb_path)) as connection:
        if modulus:
            for statement in synthetic.touch_users_sql(4 * step, modulus, 7).split(";"):
                if statement.strip():
                    connection.execute(statement)
            touched = connection.execute("select count(*) from touched_users").fetchall()[0][0]
        connection.execute(
            "copy (select user_key, user_id, cast(properties as varchar) as properties, "
            f"updated_at, deleted_at from raw.users) to '{folder / 'users.parquet'}' (format parquet)"
        )
    return touched


def _model_seconds(project: Path) -> dict[str, float]:
    """Each timed model's execution time in the last dbt command (its run_results.json)."""
    results = json.loads((project / "target" / "run_results.json").read_text())
    seconds = {r["unique_id"].rsplit(".", 1)[1]: r["execution_time"] for r in results["results"]}
    return {name: round(seconds.get(name, 0.0), 1) for name in TIMED_MODELS}


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

    def duckdb_build(moment: datetime):
        stamp = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
        return run_dbt(["build", "--vars", json.dumps({"evaluation_time": stamp})], settings)

    project = spark_project_dir(settings.dbt_project_dir)
    spark = SparkRun(project, folder / "spark-warehouse")
    steps = []
    run_dbt(["parse"], settings)  # as `prepare` does when the code location loads
    for hours, modulus in ((0, 0), *WARM_STEPS):
        moment = cold + timedelta(hours=hours)
        touched = _touch(settings, folder, hours, modulus) if hours else 0
        duckdb_seconds, _ = _timed(lambda moment=moment: duckdb_build(moment))
        spark_seconds, output = _timed(
            lambda moment=moment: spark.run(moment, folder / "users.parquet")
        )
        found = re.findall(r"incremental build: (\d+) users re-evaluated", output)
        steps.append(
            {
                "build": "cold" if not hours else f"warm +{hours}h",
                "users_changed": touched,
                "users_reevaluated_on_spark": int(found[-1]) if found else options.users,
                "duckdb_seconds": round(duckdb_seconds, 1),
                "spark_seconds": round(spark_seconds, 1),
                "spark_model_seconds": _model_seconds(project),
            }
        )
        print(json.dumps(steps[-1]), flush=True)

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
        "builds": steps,
    }
    results_json = BENCH / f"spark-results-{options.users}.json"
    results_json.write_text(json.dumps(document, indent=2) + "\n")
    rows = "\n".join(
        f"| {b['build']} | {b['users_changed']:,} | {b['users_reevaluated_on_spark']:,} | "
        f"{b['duckdb_seconds']} s | {b['spark_seconds']} s | "
        f"{round(b['spark_seconds'] / b['duckdb_seconds'], 1)}x | "
        + " | ".join(f"{b['spark_model_seconds'][m]}" for m in TIMED_MODELS)
        + " |"
        for b in steps
    )
    section = f"""## {options.users:,} users

`{document["command"]}` on {document["machine"]}, started {document["started"]}.
{options.users:,} synthetic users, {document["audiences"]} audiences, {document["memberships"]:,}
memberships after the last build. Member counts per audience equal on both engines: **{equal}**.
Each warm build is an hour after the previous one, after the users named changed.

| build | users changed | re-evaluated on Spark | DuckDB | Spark local[2] | Spark / DuckDB | {" | ".join(TIMED_MODELS)} (Spark, s) |
|---|---|---|---|---|---|{"---|" * len(TIMED_MODELS)}
{rows}
"""
    RESULTS_MD.write_text(_merge_section(RESULTS_MD, options.users, section))
    print(section)
    if not equal:
        raise SystemExit(f"members differ: duckdb {duckdb_counts} spark {spark_counts}")


def _merge_section(path: Path, users: int, section: str) -> str:
    """The results document with this size's section replaced (or added), sizes in order."""
    text = path.read_text() if path.exists() else ""
    head, _, rest = text.partition("\n## ")
    sections = {}
    for part in ("## " + rest).split("\n## ") if rest else []:
        part = part if part.startswith("## ") else "## " + part
        size = int(part.split()[1].replace(",", ""))
        sections[size] = part.rstrip() + "\n"
    sections[users] = section
    head = head.rstrip() + "\n" if head.strip() else RESULTS_HEAD
    return head + "\n" + "\n".join(sections[size] for size in sorted(sections))


RESULTS_HEAD = """# DuckDB vs local Spark, same audiences, same run

`bench/spark.py --users N`: a cold build, then three warm builds an hour apart (no user changed;
1% changed; 10% changed), each on DuckDB (dbt-duckdb, `dbt build`) and on Spark (dbt-spark session
mode, `local[2]`, `dbt run`), the same users and definitions. Wall times of one dbt command each,
start-up included (dbt's parse; for Spark the JVM, the Hive metastore and the session; Spark's also
loads the users from parquet, replacing raw.users). The per-model columns are Spark's own
execution times (dbt's run_results.json): an incremental build parses, evaluates and diffs only
the users re-evaluated; it still copies every other user's rows into the new versions of
int_users_flattened and audience_members (a scan and a write, no JSON, no condition) and scans the
typed timestamp columns for the time windows.
"""


if __name__ == "__main__":
    main()
