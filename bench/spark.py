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
follows the changed users. `--scaling 20000 100000` runs only Spark, a cold and a 1%-changed warm
build at each size in the same run, and reports what each build wrote into the versioned tables. At the end the member counts per audience on both engines must be equal
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


# The tables kept as versions: a build's writes into them follow the users it re-evaluates.
VERSIONED = ("int_users_flattened", "audience_members")


def _written(warehouse: Path, output: str) -> dict[str, dict[str, int]]:
    """Rows and bytes the committed build of `output` wrote into each versioned table (its
    version folder: a delta, or a base in a full build), read by DuckDB from the files."""
    import duckdb

    from audiences.dbt.spark import COMMITTED

    (run,) = COMMITTED.findall(output)
    written = {}
    with duckdb.connect() as connection:
        for table in VERSIONED:
            folder = warehouse / "versions" / table / f"run_id={run}"
            files = sorted(folder.glob("*.parquet"))
            rows = connection.execute(
                "select count(*) from read_parquet($files)", {"files": [str(f) for f in files]}
            ).fetchall()[0][0]
            written[table] = {"rows": rows, "bytes": sum(f.stat().st_size for f in files)}
    return written


def _model_seconds(project: Path) -> dict[str, float]:
    """Each timed model's execution time in the last dbt command (its run_results.json)."""
    results = json.loads((project / "target" / "run_results.json").read_text())
    seconds = {r["unique_id"].rsplit(".", 1)[1]: r["execution_time"] for r in results["results"]}
    return {name: round(seconds.get(name, 0.0), 1) for name in TIMED_MODELS}


# Spark's own task metrics summed per model: what its stages read, shuffled and wrote.
STAGE_METRICS = (
    "stages",
    "input_rows",
    "shuffle_rows",
    "shuffle_bytes",
    "output_rows",
    "output_bytes",
)


def _stage_metrics(event_log: Path, project: Path) -> dict[str, dict[str, int]]:
    """Each model's stages and their task metrics, from the Spark event log of the last build
    (`AUDIENCES_SPARK_EVENT_LOG`): every job is given to the model whose execution (dbt's
    run_results.json) was running when the job was submitted; jobs outside every model (the
    run's hooks: loading the users, the commit) go to `hooks`. Shuffle is what stages wrote for a
    later stage to read (`Shuffle Bytes Written`): the bytes that cross a cluster's network."""
    results = json.loads((project / "target" / "run_results.json").read_text())
    windows = []
    for result in results["results"]:
        execute = next((t for t in result["timing"] if t["name"] == "execute"), None)
        if execute:
            windows.append(
                (
                    datetime.fromisoformat(
                        execute["started_at"].replace("Z", "+00:00")
                    ).timestamp(),
                    datetime.fromisoformat(
                        execute["completed_at"].replace("Z", "+00:00")
                    ).timestamp(),
                    result["unique_id"].rsplit(".", 1)[1],
                )
            )
    (log,) = [path for path in event_log.iterdir() if path.is_file()]
    stage_model: dict[int, str] = {}
    totals: dict[str, dict[str, int]] = {}
    with log.open() as events:
        for line in events:
            event = json.loads(line)
            kind = event["Event"]
            if kind == "SparkListenerJobStart":
                moment = event["Submission Time"] / 1000
                model = next((m for start, end, m in windows if start <= moment <= end), "hooks")
                for stage in event["Stage IDs"]:
                    stage_model[stage] = model
            elif kind == "SparkListenerStageCompleted":
                info = event["Stage Info"]
                if "Completion Time" in info and info.get("Number of Tasks"):
                    model = stage_model.get(info["Stage ID"], "hooks")
                    totals.setdefault(model, dict.fromkeys(STAGE_METRICS, 0))["stages"] += 1
            elif kind == "SparkListenerTaskEnd" and event.get("Task Metrics"):
                metrics = event["Task Metrics"]
                model = stage_model.get(event["Stage ID"], "hooks")
                total = totals.setdefault(model, dict.fromkeys(STAGE_METRICS, 0))
                total["input_rows"] += metrics["Input Metrics"]["Records Read"]
                total["shuffle_rows"] += metrics["Shuffle Write Metrics"]["Shuffle Records Written"]
                total["shuffle_bytes"] += metrics["Shuffle Write Metrics"]["Shuffle Bytes Written"]
                total["output_rows"] += metrics["Output Metrics"]["Records Written"]
                total["output_bytes"] += metrics["Output Metrics"]["Bytes Written"]
    return totals


def _scaling(sizes: list[int]) -> None:
    """`--scaling`: Spark only, at each size in the same run: a cold build, then a warm build an
    hour later with 1% of the users changed; what each wrote into the versioned tables (rows and
    bytes of its version) beside Spark's model times. A warm build whose writes follow the changed
    users writes about the share it re-evaluated of what the cold build wrote, at every size."""
    started = datetime.now(UTC)
    load = os.getloadavg()
    cold = datetime.fromisoformat(synthetic.EVALUATION_TIME.replace("Z", "+00:00"))
    results = []
    for users in sizes:
        folder = BENCH / "data" / f"spark-{users}"
        settings = _prepare(folder, users)
        project = spark_project_dir(settings.dbt_project_dir)
        warehouse = folder / "spark-warehouse"
        spark = SparkRun(project, warehouse)
        for hours, modulus in ((0, 0), (1, 100)):
            touched = _touch(settings, folder, hours, modulus) if hours else 0
            moment, loaded = cold + timedelta(hours=hours), folder / "users.parquet"
            event_log = folder / "spark-events" / f"build-{hours}"
            shutil.rmtree(event_log, ignore_errors=True)
            event_log.mkdir(parents=True)
            os.environ["AUDIENCES_SPARK_EVENT_LOG"] = str(event_log)
            # Joins planned as at 100M users (shuffled, not broadcast), for the shuffle's cost model.
            os.environ["AUDIENCES_SPARK_BROADCAST_BYTES"] = "-1"
            started_at = time.perf_counter()
            output = spark.run(moment, loaded)
            seconds = time.perf_counter() - started_at
            found = re.findall(r"incremental build: (\d+) users re-evaluated", output)
            results.append(
                {
                    "users": users,
                    "build": "cold" if not hours else "warm, 1% changed",
                    "users_changed": touched,
                    "users_reevaluated": int(found[-1]) if found else users,
                    "spark_seconds": round(seconds, 1),
                    "written": _written(warehouse, output),
                    "spark_model_seconds": _model_seconds(project),
                    "spark_stages": _stage_metrics(event_log, project),
                    "load_after": round(os.getloadavg()[0], 1),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    document = {
        "command": "bench/spark.py --scaling " + " ".join(str(n) for n in sizes),
        "started": started.isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.1f} at start",
        "builds": results,
    }
    # (bench/spark-scaling.json is the run before stages were read: that section's data, kept)
    name = f"spark-scaling-{'-'.join(map(str, sizes))}.json"
    (BENCH / name).write_text(json.dumps(document, indent=2) + "\n")
    cold_rows = {b["users"]: b for b in results if b["build"] == "cold"}
    lines = []
    for b in results:
        share = " | ".join(
            f"{b['written'][t]['rows']:,} rows, {b['written'][t]['bytes'] / 1e6:.2f} MB"
            f" ({b['written'][t]['bytes'] / cold_rows[b['users']]['written'][t]['bytes']:.1%} of cold)"
            for t in VERSIONED
        )
        models = b["spark_model_seconds"]
        lines.append(
            f"| {b['users']:,} | {b['build']} | {b['users_changed']:,} | {b['users_reevaluated']:,} | "
            f"{share} | {b['spark_seconds']} s | {models['int_users_flattened']} | "
            f"{models['audience_members']} | {models['membership_changes']} | {b['load_after']} |"
        )
    print(
        f"`{document['command']}` on {document['machine']}, started {document['started']}.\n\n"
        "| users | build | changed | re-evaluated | written: int_users_flattened | written: "
        "audience_members | Spark wall | int_users_flattened (s) | audience_members (s) | "
        "membership_changes (s) | load after |\n" + "|---" * 11 + "|\n" + "\n".join(lines)
    )
    print("\n" + _stages_table(results) + "\n\n" + _shuffle_model(results))


def _stages_table(results: list[dict]) -> str:
    """Spark's task metrics per model and build (the event log's, `_stage_metrics`)."""
    lines = []
    for b in results:
        for model, m in sorted(
            b["spark_stages"].items(), key=lambda item: -item[1]["shuffle_bytes"]
        ):
            lines.append(
                f"| {b['users']:,} | {b['build']} | {model} | {m['stages']} | {m['input_rows']:,} | "
                f"{m['shuffle_rows']:,} | {m['shuffle_bytes'] / 1e6:.2f} | {m['output_rows']:,} | "
                f"{m['output_bytes'] / 1e6:.2f} |"
            )
    return (
        "| users | build | model | stages | rows read | rows shuffled | MB shuffled | rows written "
        "| MB written |\n" + "|---" * 9 + "|\n" + "\n".join(lines)
    )


# The sizes the cost model extrapolates to, and the share of users a warm build re-evaluates there.
MODEL_SIZES = (100_000_000, 1_000_000_000)
WARM_SHARE = 0.01


def _shuffle_model(results: list[dict]) -> str:
    """Bytes shuffled at 100M and 1B users, per model: a cold build's per user, a warm build's per
    re-evaluated user, both from the largest size measured, scaled linearly (a cold build's to every
    user, a warm build's to 1% of them)."""
    largest = max(b["users"] for b in results)
    builds = {b["build"]: b for b in results if b["users"] == largest}
    cold, warm = builds["cold"], builds.get("warm, 1% changed")
    lines = []
    for model in sorted(
        cold["spark_stages"], key=lambda m: -cold["spark_stages"][m]["shuffle_bytes"]
    ):
        per_user = cold["spark_stages"][model]["shuffle_bytes"] / largest
        per_reevaluated = (
            warm["spark_stages"].get(model, {"shuffle_bytes": 0})["shuffle_bytes"]
            / max(warm["users_reevaluated"], 1)
            if warm
            else None
        )
        cells = [f"{per_user * size / 1e9:,.1f} GB" for size in MODEL_SIZES]
        cells += [
            f"{per_reevaluated * size * WARM_SHARE / 1e9:,.2f} GB" if warm else "-"
            for size in MODEL_SIZES
        ]
        lines.append(f"| {model} | {per_user:,.0f} | " + " | ".join(cells) + " |")
    return (
        f"Shuffle at 100M and 1B users, from the {largest:,}-user builds (bytes per user cold; a warm "
        f"build's per re-evaluated user, at {WARM_SHARE:.0%} re-evaluated):\n\n"
        "| model | bytes per user, cold | cold, 100M | cold, 1B | warm 1%, 100M | warm 1%, 1B |\n"
        + "|---" * 6
        + "|\n"
        + "\n".join(lines)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument(
        "--scaling",
        type=int,
        nargs="+",
        metavar="USERS",
        help="Spark only: a cold and a 1%%-changed warm build at each size, with what each wrote",
    )
    options = parser.parse_args()
    os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
    if options.scaling:
        _scaling(options.scaling)
        return
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
    sections, others = {}, []
    for part in ("## " + rest).split("\n## ") if rest else []:
        part = part if part.startswith("## ") else "## " + part
        size = part.split()[1].replace(",", "")
        if size.isdigit():
            sections[int(size)] = part.rstrip() + "\n"
        else:  # a section of its own (--scaling's, by hand): kept after the sizes
            others.append(part.rstrip() + "\n")
    sections[users] = section
    head = head.rstrip() + "\n" if head.strip() else RESULTS_HEAD
    return head + "\n" + "\n".join([*(sections[size] for size in sorted(sections)), *others])


RESULTS_HEAD = """# DuckDB vs local Spark, same audiences, same run

`bench/spark.py --users N`: a cold build, then three warm builds an hour apart (no user changed;
1% changed; 10% changed), each on DuckDB (dbt-duckdb, `dbt build`) and on Spark (dbt-spark session
mode, `local[2]`, `dbt run`), the same users and definitions. Wall times of one dbt command each,
start-up included (dbt's parse; for Spark the JVM, the Hive metastore and the session; Spark's also
loads the users from parquet, replacing raw.users). The per-model columns are Spark's own
execution times (dbt's run_results.json): an incremental build parses, evaluates and diffs only
the users re-evaluated, and writes only their rows (a delta of int_users_flattened and
audience_members); it still reads the committed state (the time windows' timestamp columns, the
window users' rows).
"""


if __name__ == "__main__":
    main()
