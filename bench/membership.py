"""Benchmark of membership events: diff and publish cost, delivery throughput, freshness.

    .venv/bin/python bench/membership.py --users 1000000

Measured in one run, on the same synthetic users and 50 audiences as `bench/run.py`:

1. **Diff and publish against evaluation.** After a cold evaluation (dbt build, diff, publish of the
   first members as backfill), 1% of users change (`touch_users_sql`) and the audiences are
   re-evaluated: the dbt build (the evaluation), then the diff into the outbox and the publish into
   the SQLite store with workflow triggers on five audiences. Target: diff + publish under 10% of
   the evaluation.
2. **Delivery throughput** to a webhook sink served by a local HTTP server on 127.0.0.1, one event
   per request and batched (100 per request). Target: at least 2,000 events per second batched.
3. **Freshness** with the sensor running: one user's update lands in a source file; a thread plays
   the Dagster daemon (evaluating `user_sources_changed` every `minimum_interval_seconds`), the run it
   requests executes the main job in process, and the clock stops when the user's entry trigger
   appears in the file sink. Target: under 30 seconds at 1M users.

Results go to `bench/membership-results.md` and `.json`. Data lives in `bench/data/` (ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import duckdb  # noqa: E402
import polars as pl  # noqa: E402
import synthetic  # noqa: E402

from audiences.dbt.project import generate, prepare, run_dbt  # noqa: E402
from audiences.membership.changes import record_changes  # noqa: E402
from audiences.settings import Settings  # noqa: E402
from audiences.store.database import MembershipStore  # noqa: E402
from audiences.workflows.publish import publish_outbox  # noqa: E402
from audiences.workflows.triggers import WorkflowTrigger  # noqa: E402

DATA = ROOT / "bench" / "data"
T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
TRIGGERED = ["free-plan", "paying-customers", "enterprise-accounts"]
PROBE = {
    "name": "Freshness probe",
    "type": "dynamic",
    "description": "Users carrying the benchmark's probe value.",
    "segments": [
        {
            "conditions": [
                {
                    "property": "recipient.freshness_probe",
                    "operator": "equal_to",
                    "argument": "present",
                }
            ]
        }
    ],
}


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def setup(folder: Path, users: int) -> Settings:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    definitions = folder / "audiences"
    synthetic.write_definitions(definitions)
    (definitions / "freshness-probe").mkdir()
    (definitions / "freshness-probe" / "audience.json").write_text(json.dumps(PROBE))
    project = folder / "dbt_project"
    shutil.copytree(
        ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs", ".user.yml")
    )
    shutil.rmtree(project / "models" / "audiences" / "custom")
    workflows = folder / "workflows"
    for key in [*TRIGGERED, "freshness-probe"]:
        (workflows / f"{key}-welcome").mkdir(parents=True)
        (workflows / f"{key}-welcome" / "trigger.json").write_text(
            json.dumps({"audience": key, "on": "entered"})
        )
    (folder / "sinks.yml").write_text(
        "default: file\nsinks:\n  file: {type: file, path: out/triggers.jsonl}\n"
    )
    settings = Settings.from_env(
        {},
        duckdb_path=folder / "warehouse.duckdb",
        definitions_dir=definitions,
        dbt_project_dir=project,
        workflows_dir=workflows,
        sinks_file=folder / "sinks.yml",
        users_source=str(folder / "updates.parquet"),
        source_mode="stream",
    )
    with duckdb.connect(str(settings.duckdb_path)) as connection:
        synthetic.generate_users(connection, users)
    pl.DataFrame({"id": ["user_000000001"], "probe_round": [0]}).write_parquet(
        folder / "updates.parquet"
    )
    generate(settings)  # loading only checks the models
    prepare(settings)
    return settings


def triggers() -> dict[str, WorkflowTrigger]:
    return {f"{key}-welcome": WorkflowTrigger(f"{key}-welcome", key) for key in TRIGGERED}


def evaluate(
    settings: Settings, moment: datetime, store: MembershipStore, lean: bool = False
) -> dict:
    """One evaluation as the pipeline runs it: the clock set, dbt build (after the first, only the
    models a re-evaluation rebuilds, as the Dagster asset does), the diff, the publish."""
    from audiences.warehouse.evaluation import set_evaluation_clock
    from pipelines.defs.audiences import UNCHANGED_WHEN_DEFINITIONS_ARE

    with duckdb.connect(str(settings.duckdb_path)) as connection:
        set_evaluation_clock(connection, moment)
    arguments = (
        ["build", "--exclude", " ".join(UNCHANGED_WHEN_DEFINITIONS_ARE)] if lean else ["build"]
    )
    _, evaluation = timed(run_dbt, arguments, settings)
    with duckdb.connect(str(settings.duckdb_path)) as connection:
        connection.execute("set TimeZone = 'UTC'")
        summary, diff = timed(record_changes, connection, moment)
        report, publish = timed(publish_outbox, connection, store, triggers(), "file", moment)
        elapsed = json.loads(
            (settings.dbt_project_dir / "target" / "run_results.json").read_text()
        )["elapsed_time"]
    return {
        "evaluation_wall_s": evaluation,
        "evaluation_dbt_s": elapsed,
        "diff_s": diff,
        "publish_s": publish,
        "entered": summary.entered,
        "exited": summary.exited,
        "events_published": report.events,
        "deliveries_created": report.deliveries,
    }


class _Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def delivery_throughput(folder: Path, count: int) -> dict:
    from audiences.delivery.loop import deliver_due
    from audiences.delivery.sinks import WebhookSink
    from audiences.store import database as tables

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    results = {}
    for batch_size in (1, 100):
        store_path = folder / f"delivery-{batch_size}.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{store_path}{suffix}").unlink(missing_ok=True)
        store = MembershipStore(f"sqlite:///{store_path}").create()
        stamp = (datetime.now(UTC) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        rows = [
            {
                "delivery_id": f"d{i:08d}",
                "event_id": f"e{i:08d}",
                "broadcast_id": None,
                "workflow_key": "welcome",
                "sink": "webhook",
                "audience_key": "free-plan",
                "user_id": f"user_{i}",
                "tenant": None,
                "payload": json.dumps({"recipients": [f"user_{i}"], "data": {"event": "entered"}}),
                "status": "pending",
                "attempts": 0,
                "next_attempt_at": stamp,
                "last_error": None,
                "batch_id": None,
                "created_at": stamp,
                "delivered_at": None,
            }
            for i in range(count)
        ]
        with store.engine.begin() as connection:
            store.insert_ignoring_duplicates(connection, tables.deliveries, rows)
        sink = WebhookSink(
            "webhook",
            url,
            "whsec_" + "YmVuY2htYXJrLXNlY3JldC1rZXktMzItYnl0ZXMhIQ==",
            batch_size=batch_size,
        )
        report, seconds = timed(deliver_due, store, {"webhook": sink})
        sink.close()
        store.dispose()
        results[f"batch_{batch_size}"] = {
            "events": count,
            "seconds": seconds,
            "delivered": report.delivered,
            "events_per_second": report.delivered / seconds,
        }
    server.shutdown()
    return results


def freshness(settings: Settings, rounds: int) -> dict:
    """Source row changed -> sensor tick -> main job -> trigger in the sink file, timed end to end."""
    import dagster as dg

    from pipelines import build_definitions
    from pipelines.defs.schedules import MAIN_JOB
    from pipelines.defs.sensors import user_sources_changed

    folder = settings.duckdb_path.parent
    sink_file = folder / "out" / "triggers.jsonl"
    os.environ.update(settings.environment_variables())
    os.environ.pop("AUDIENCES_EVALUATION_TIME", None)
    defs = build_definitions()
    job = defs.resolve_job_def(MAIN_JOB)
    interval = user_sources_changed.minimum_interval_seconds
    cursor = user_sources_changed(dg.build_sensor_context(cursor=None)).cursor
    measurements = []
    with dg.DagsterInstance.ephemeral() as instance:
        for round_number in range(1, rounds + 1):
            user = f"user_{round_number * 7919:09d}"
            before = sink_file.read_text().count(user) if sink_file.exists() else 0
            time.sleep(
                interval * (round_number % 3) / 3
            )  # the change lands at some point of the tick cycle
            changed_at = time.perf_counter()
            pl.DataFrame({"id": [user], "freshness_probe": ["present"]}).write_parquet(
                folder / "updates.parquet"
            )
            run_seconds = None
            while True:  # the daemon: a sensor tick every `interval` seconds
                result = user_sources_changed(dg.build_sensor_context(cursor=cursor))
                cursor = result.cursor
                if result.run_requests:
                    requested_at = time.perf_counter()
                    job.execute_in_process(
                        instance=instance,
                        raise_on_error=True,
                        run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
                    )
                    run_seconds = time.perf_counter() - requested_at
                    break
                time.sleep(interval)
            arrived = sink_file.exists() and sink_file.read_text().count(user) > before
            measurements.append(
                {
                    "user": user,
                    "seconds_to_sink": time.perf_counter() - changed_at,
                    "run_seconds": run_seconds,
                    "trigger_at_sink": arrived,
                }
            )
            with duckdb.connect(
                str(settings.duckdb_path)
            ) as connection:  # reset the probe for the next round
                connection.execute(
                    "update raw.users set properties = json_merge_patch(properties, '{\"freshness_probe\": null}'), "
                    "updated_at = now() where user_id = $u",
                    {"u": user},
                )
    return {
        "sensor_interval_s": interval,
        "rounds": measurements,
        "worst_s": max(m["seconds_to_sink"] for m in measurements),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--deliveries", type=int, default=20_000)
    parser.add_argument("--freshness-rounds", type=int, default=3)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the warehouse and store of the last run at this size",
    )
    options = parser.parse_args()
    folder = DATA / f"membership-{options.users}"
    results: dict = {
        "users": options.users,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "duckdb": duckdb.__version__,
        },
    }
    if options.reuse:  # the warehouse and store of an earlier run at this size
        previous = json.loads((ROOT / "bench" / "membership-results.json").read_text())
        settings = Settings.from_env(
            {},
            duckdb_path=folder / "warehouse.duckdb",
            definitions_dir=folder / "audiences",
            dbt_project_dir=folder / "dbt_project",
            workflows_dir=folder / "workflows",
            sinks_file=folder / "sinks.yml",
            users_source=str(folder / "updates.parquet"),
            source_mode="stream",
        )
        results["setup_s"], results["cold"] = previous["setup_s"], previous["cold"]
        with duckdb.connect(str(settings.duckdb_path)) as connection:
            # After every time already in the history (the freshness rounds evaluate at the wall
            # clock), and before now, so that this run's freshness rounds come later still.
            last = connection.execute(
                "select greatest(max(entered_at), max(exited_at)) from raw.membership_intervals"
            ).fetchall()[0][0]
            clock = connection.execute(
                "select max(evaluated_at) from raw.evaluation_clock"
            ).fetchall()[0][0]
        base = max(T0, last or T0, clock or T0) + timedelta(minutes=1)
        # The product's current dbt project (the copy is from the earlier run), generated again.
        shutil.rmtree(settings.dbt_project_dir)
        shutil.copytree(
            ROOT / "dbt_project",
            settings.dbt_project_dir,
            ignore=shutil.ignore_patterns("target", "logs", ".user.yml"),
        )
        shutil.rmtree(settings.dbt_project_dir / "models" / "audiences" / "custom")
        generate(settings)  # loading only checks the models
        prepare(settings)
    else:
        settings, results["setup_s"] = timed(setup, folder, options.users)
        base = T0
    store = MembershipStore(settings.store_url).create()
    if not options.reuse:
        results["cold"] = evaluate(settings, T0, store)
        print("cold", results["cold"], flush=True)
    if options.reuse:
        # The first build with this code may rebuild what it changed (a model's SQL): not measured.
        results["settle"] = evaluate(settings, base, store)
        print("settle", results["settle"], flush=True)
    warm = []
    for round_number in (1, 2):
        with duckdb.connect(str(settings.duckdb_path)) as connection:
            connection.execute(synthetic.touch_users_sql(round_number))
            # Later than anything loaded before (the freshness rounds load at the wall clock).
            connection.execute("update raw.users set updated_at = now() where user_key % 100 = 7")
        warm.append(
            evaluate(settings, base + timedelta(minutes=15 * round_number), store, lean=True)
        )
        warm[-1]["diff_and_publish_share"] = (warm[-1]["diff_s"] + warm[-1]["publish_s"]) / warm[
            -1
        ]["evaluation_wall_s"]
        print("warm", warm[-1], flush=True)
    results["warm"] = warm
    store.dispose()
    results["delivery"] = delivery_throughput(folder, options.deliveries)
    print("delivery", results["delivery"], flush=True)
    results["freshness"] = freshness(settings, options.freshness_rounds)
    print("freshness", results["freshness"], flush=True)
    write_results(results, " ".join(sys.argv[1:]))


def write_results(r: dict, arguments: str) -> None:
    (ROOT / "bench" / "membership-results.json").write_text(json.dumps(r, indent=2, default=str))
    cold, warm = r["cold"], r["warm"]
    lines = [
        "# Membership events benchmark",
        "",
        f"Produced by `.venv/bin/python bench/membership.py {arguments}` on {r['started']} "
        f"({r['machine']['cores']} cores, Python {r['machine']['python']}, DuckDB {r['machine']['duckdb']}); "
        "single runs on a shared, noisy machine. Details: the docstring of `bench/membership.py`.",
        "",
        f"## {r['users']:,} users, 50 audiences (+1 probe), triggers on {len(TRIGGERED)} audiences",
        "",
        "| run | evaluation (dbt build, wall) | dbt elapsed | diff | publish | diff+publish ÷ evaluation | entered | exited | deliveries |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| cold (first evaluation, all backfill; from the first run) | {cold['evaluation_wall_s']:.1f} s | {cold['evaluation_dbt_s']:.1f} s | "
        f"{cold['diff_s']:.2f} s | {cold['publish_s']:.1f} s | {(cold['diff_s'] + cold['publish_s']) / cold['evaluation_wall_s']:.0%} | "
        f"{cold['entered']:,} | {cold['exited']:,} | {cold['deliveries_created']:,} |",
    ]
    if r.get("settle"):
        settle = r["settle"]
        lines.append(
            f"| settle (first build with this code, not a warm round) | {settle['evaluation_wall_s']:.1f} s | "
            f"{settle['evaluation_dbt_s']:.1f} s | {settle['diff_s']:.2f} s | {settle['publish_s']:.2f} s | | "
            f"{settle['entered']:,} | {settle['exited']:,} | {settle['deliveries_created']:,} |"
        )
    for index, run in enumerate(warm, start=1):
        lines.append(
            f"| warm {index} (1% of users changed) | {run['evaluation_wall_s']:.1f} s | {run['evaluation_dbt_s']:.1f} s | "
            f"{run['diff_s']:.2f} s | {run['publish_s']:.2f} s | **{run['diff_and_publish_share']:.1%}** | "
            f"{run['entered']:,} | {run['exited']:,} | {run['deliveries_created']:,} |"
        )
    lines += [
        "",
        "Delivery to a local webhook (127.0.0.1, Standard Webhooks signatures):",
        "",
        "| batching | events | seconds | events per second |",
        "|---|---:|---:|---:|",
    ]
    for name, d in r["delivery"].items():
        lines.append(
            f"| {name.replace('_', ' ')} | {d['delivered']:,} | {d['seconds']:.2f} | **{d['events_per_second']:,.0f}** |"
        )
    f = r["freshness"]
    lines += [
        "",
        f"Freshness with the sensor polling every {f['sensor_interval_s']} s (a changed row in a source "
        "file to its trigger in the file sink, main job executed in process):",
        "",
        "| round | seconds to sink | of which the run | trigger arrived |",
        "|---|---:|---:|---|",
    ]
    for index, m in enumerate(f["rounds"], start=1):
        lines.append(
            f"| {index} | **{m['seconds_to_sink']:.1f}** | {m['run_seconds']:.1f} | {m['trigger_at_sink']} |"
        )
    (ROOT / "bench" / "membership-results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
