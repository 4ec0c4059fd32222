"""Benchmark: the product's audience evaluation against a plain SQL baseline and the reference evaluator.

    .venv/bin/python bench/run.py --users 1000000 10000000    # writes bench/results.md and .json
    .venv/bin/python bench/run.py --quick                     # 100k users, smoke test (bench/data only)

What is measured, and why
-------------------------
For each size, synthetic users (bench/synthetic.py: typed fields, lists, nested custom objects,
missing and null properties, 0.5% deleted) are generated straight into `raw.users` of a DuckDB file
under bench/data/<size>/, and 50 dynamic audiences are written as Knock-layout definitions under
bench/data/audiences/. The repo's dbt project is copied to bench/data/<size>/dbt_project and
AUDIENCES_DBT_PROJECT points there, so the repo's own generated models are never touched.

Every measured step runs in its own child process (`run.py --child <step>`), so wall time and peak
memory are clean. Peak memory is reported three ways: the child's ru_maxrss (os.wait4), the largest
ru_maxrss among the child's own children (RUSAGE_CHILDREN read by the child: this is where dbt's
DuckDB lives), and the peak of the summed RSS of the whole process tree, sampled every 50 ms from
/proc. "Peak" in the tables is the largest of these (normally the sampled tree sum).

1. Product evaluation, cold (no `int_users_flattened` yet: every user's JSON is extracted): the
   `dbt build --vars {"evaluation_time": ...}` that the Dagster asset `audience_models` runs, once
   through `audiences.dbt_project.run_dbt` and once through Dagster itself (the `reevaluate_audiences`
   job of `pipelines.definitions.defs`, `execute_in_process`). dbt's own numbers come from
   target/run_results.json: `elapsed_time` is the evaluation itself; wall minus that is the fixed
   start-up cost (dbt start-up and parsing, Dagster's definitions load, run and event overhead).
   A no-op `dbt build --select none_such` gives dbt's pure start-up cost.
2. Product evaluation, warm (what the 15-minute schedule and sensors run): 1% of users are touched
   (properties and `updated_at` updated in raw.users), then the same build; it extracts only the
   changed users, then rebuilds the audience views and `audience_members`. Also a tick with no
   data change at all.
3. Plain baseline: one `insert ... select` per audience straight over raw.users, reading every
   property from JSON with the product's own compiler (`property_json` + `attribute_expression`, as
   `audiences/warehouse.py` does when there is no flattened table), writing (audience_key, user_id).
4. Reference evaluator (`audiences.conditions.reference.evaluate_audience`) on a ~20k-user sample,
   extrapolated linearly to the full size (evaluation time only, not JSON parsing: the conservative
   choice for the product's ratio).
5. `preview` (`audiences.warehouse.preview`) of 5 audiences, with `int_users_flattened` absent (inline
   JSON) and fresh.

Correctness is checked in the same run: the product's member counts per audience must equal the
baseline's (and the member sets too: a full symmetric difference per audience), and the reference
evaluator's members on the sample must equal the product's members among those users. A mismatch
is printed loudly and recorded in the results; it is never hidden.

The ratios use dbt's `elapsed_time` for the product (the evaluation itself) and the sum of the 50
query times for the baseline; the wall-clock ratios (start-up included) are reported beside them.
Run on a shared, noisy 2-core machine: each number is one run, with the load average recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DATA = BENCH / "data"
DEFINITIONS = DATA / "audiences"
SOURCES_FILE = DATA / "sources.yml"
RESULTS_MD = BENCH / "results.md"
RESULTS_JSON = BENCH / "results.json"
ANALYSIS_MD = BENCH / "analysis.md"

sys.path.insert(0, str(BENCH))
import synthetic  # noqa: E402

EVALUATION_TIME = synthetic.EVALUATION_TIME
REFERENCE_SAMPLE = 20_000
PREVIEW_KEYS = ["churn-risk", "eu-customers", "beta-testers", "annual-renewal-soon", "nps-promoters"]
TARGETS = {"baseline_ratio": 10, "reference_ratio": 200, "peak_memory_mb_10m": 2048, "preview_s_1m": 1.0}


def later(minutes: int) -> str:
    base = datetime.fromisoformat(EVALUATION_TIME.replace("Z", "+00:00"))
    return (base + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


# =============================================================================================
# Child steps: each runs in its own process and returns a JSON-able dict.


def _settings(params):
    from audiences.settings import Settings

    return Settings.from_env(duckdb_path=params["db"], definitions_dir=params["definitions"],
                             dbt_project_dir=params["project"], sources_file=str(SOURCES_FILE))


def _connect(params, read_only=False):
    from audiences.warehouse import connect

    return connect(Path(params["db"]), read_only=read_only)


def step_generate(params):
    db = Path(params["db"])
    for suffix in ("", ".wal"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    connection = _connect(params)
    start = time.perf_counter()
    synthetic.generate_users(connection, params["users"])
    seconds = time.perf_counter() - start
    total, active, size = connection.execute(
        "select count(*), count(*) filter (where deleted_at is null), sum(length(properties::varchar)) from raw.users"
    ).fetchone()
    connection.close()
    return {"seconds": seconds, "users": total, "active_users": active, "json_bytes": size,
            "file_bytes": db.stat().st_size}


def step_prepare(params):
    from audiences.dbt_project import prepare

    start = time.perf_counter()
    manifest = prepare(_settings(params))
    return {"seconds": time.perf_counter() - start, "manifest": str(manifest)}


def step_dbt_noop(params):
    from audiences.dbt_project import run_dbt

    start = time.perf_counter()
    result = run_dbt(["build", "--select", "none_such"], _settings(params))
    return {"seconds": time.perf_counter() - start, "stdout_tail": result.stdout[-300:]}


def _run_results(path: Path) -> dict:
    document = json.loads(path.read_text())
    nodes = [{"unique_id": r["unique_id"], "status": r["status"], "seconds": r["execution_time"],
              "rows": (r.get("adapter_response") or {}).get("rows_affected")}
             for r in document["results"]]
    statuses = {}
    for node in nodes:
        statuses[node["status"]] = statuses.get(node["status"], 0) + 1
    return {"path": str(path), "elapsed_s": document["elapsed_time"], "sum_node_s": sum(n["seconds"] for n in nodes),
            "nodes": sorted(nodes, key=lambda n: -n["seconds"]), "statuses": statuses}


def _product_counts(params) -> dict:
    connection = _connect(params, read_only=True)
    try:
        counts = dict(connection.execute(
            "select audience_key, count(*) from main.audience_members where tenant is null group by 1").fetchall())
        flattened = connection.execute("select count(*) from main.int_users_flattened").fetchone()[0]
    finally:
        connection.close()
    return {"counts": counts, "total_members": sum(counts.values()), "flattened_rows": flattened}


def step_product_dbt(params):
    from audiences.dbt_project import run_dbt

    settings = _settings(params)
    arguments = ["build", "--vars", json.dumps({"evaluation_time": params["evaluation_time"]})]
    start = time.perf_counter()
    run_dbt(arguments, settings)
    wall = time.perf_counter() - start
    run_results = _run_results(settings.dbt_project_dir / "target" / "run_results.json")
    return {"wall_s": wall, "dbt": run_results, **_product_counts(params)}


def step_product_dagster(params):
    # The settings reach Dagster's definitions through these variables, set before the import.
    os.environ.update({"AUDIENCES_DUCKDB": params["db"], "AUDIENCES_DEFINITIONS": params["definitions"],
                       "AUDIENCES_DBT_PROJECT": params["project"], "AUDIENCES_SOURCES": str(SOURCES_FILE)})
    start = time.perf_counter()
    import dagster as dg
    from pipelines.definitions import defs

    job = defs.resolve_job_def("reevaluate_audiences")
    loaded = time.perf_counter()
    instance = dg.DagsterInstance.ephemeral()
    result = job.execute_in_process(
        run_config={"ops": {"audience_models": {"config": {"evaluation_time": params["evaluation_time"]}}}},
        instance=instance,
    )
    finished = time.perf_counter()
    if not result.success:
        raise RuntimeError("the Dagster run failed")
    steps = {s.step_key: s.end_time - s.start_time for s in instance.get_run_step_stats(result.run_id)
             if s.end_time and s.start_time}
    target = Path(params["project"]) / "target"
    candidates = sorted(target.glob(f"*{result.run_id[:7]}*/run_results.json"), key=lambda p: p.stat().st_mtime)
    run_results = _run_results(candidates[-1])
    return {"load_s": loaded - start, "execute_s": finished - loaded, "wall_s": finished - start,
            "steps_s": steps, "dbt": run_results, **_product_counts(params)}


def _baseline_context(now):
    from sqlglot import exp

    from audiences.conditions.compiler import CompileContext, attribute_expression, property_json, timestamp_literal

    properties, identifier = exp.column("properties", table="users"), exp.column("user_id", table="users")
    return CompileContext(
        attribute=lambda a: attribute_expression(property_json(a.path, properties, identifier), a.variant),
        audience_members=lambda key: exp.select("user_id").from_("bench.baseline_members").where(
            exp.column("audience_key").eq(exp.Literal.string(key))),
        evaluation_time=timestamp_literal(now),
        user_key=identifier,  # memberships are kept by user id
        user_id=identifier,
    )


def step_baseline(params):
    from sqlglot import exp

    from audiences.conditions.compiler import compile_segments, render
    from audiences.definitions import evaluation_order, load_definitions
    from audiences.settings import parse_evaluation_time

    definitions = load_definitions(Path(params["definitions"]))
    context = _baseline_context(parse_evaluation_time(params["evaluation_time"]))
    connection = _connect(params)
    connection.execute("create schema if not exists bench")
    connection.execute("drop table if exists bench.baseline_members")
    connection.execute("create table bench.baseline_members (audience_key varchar, user_id varchar)")
    per_audience, start = {}, time.perf_counter()
    for key in evaluation_order(definitions):
        condition = render(compile_segments(definitions[key].segments, context))
        sql = (f"insert into bench.baseline_members select {render(exp.Literal.string(key))}, users.user_id "
               f"from raw.users as users where users.deleted_at is null and ({condition})")
        began = time.perf_counter()
        rows = connection.execute(sql).fetchone()[0]
        per_audience[key] = {"seconds": time.perf_counter() - began, "rows": rows}
    seconds = time.perf_counter() - start
    connection.execute("checkpoint")
    checkpointed = time.perf_counter() - start
    counts = {key: value["rows"] for key, value in per_audience.items()}
    # What a baseline query costs without writing: the same filter, counted (three examples).
    read_only = {}
    for key in ("free-plan", "churn-risk", "northern-high-value"):
        if key in definitions:
            condition = render(compile_segments(definitions[key].segments, context))
            began = time.perf_counter()
            connection.execute(f"select count(*) from raw.users as users where users.deleted_at is null and ({condition})").fetchone()
            read_only[key] = time.perf_counter() - began
    connection.close()
    return {"seconds": seconds, "with_checkpoint_s": checkpointed, "per_audience": per_audience, "counts": counts,
            "total_members": sum(counts.values()), "count_only_s": read_only}


def _sample_step(params) -> int:
    return max(1, params["users"] // REFERENCE_SAMPLE)


def step_reference(params):
    from audiences.conditions.reference import evaluate_audience
    from audiences.definitions import evaluation_order, load_definitions
    from audiences.settings import parse_evaluation_time

    definitions = load_definitions(Path(params["definitions"]))
    now = parse_evaluation_time(params["evaluation_time"])
    connection = _connect(params, read_only=True)
    step = _sample_step(params)
    start = time.perf_counter()
    rows = connection.execute(
        f"select user_id, properties from raw.users where deleted_at is null and user_key % {step} = 0 order by user_key"
    ).fetchall()
    active = connection.execute("select count(*) from raw.users where deleted_at is null").fetchone()[0]
    connection.close()
    read = time.perf_counter()
    users = [{**json.loads(properties), "id": user_id} for user_id, properties in rows]
    parsed = time.perf_counter()
    members: dict[str, set[str]] = {}
    is_member = lambda key, user_id: user_id in members.get(key, ())  # noqa: E731
    for key in evaluation_order(definitions):
        audience = definitions[key].raw
        members[key] = {user["id"] for user in users if evaluate_audience(audience, user, now=now, is_member=is_member)}
    evaluated = time.perf_counter()
    sample_path = Path(params["sample_path"])
    sample_path.write_text(json.dumps({key: sorted(ids) for key, ids in members.items()}))
    evaluate_s = evaluated - parsed
    scale = active / len(users)
    return {"sample_users": len(users), "active_users": active, "sample_step": step, "read_s": read - start,
            "parse_s": parsed - read, "evaluate_s": evaluate_s, "per_user_ms": 1000 * evaluate_s / len(users),
            "extrapolated_s": evaluate_s * scale, "extrapolated_with_parse_s": (evaluate_s + parsed - read) * scale,
            "sample_members": sum(len(v) for v in members.values())}


def step_check(params):
    """Baseline vs product (counts and sets), reference sample vs product."""
    connection = _connect(params, read_only=True)
    product = dict(connection.execute(
        "select audience_key, count(*) from main.audience_members where tenant is null group by 1").fetchall())
    baseline = dict(connection.execute("select audience_key, count(*) from bench.baseline_members group by 1").fetchall())
    keys = sorted(set(product) | set(baseline) | set(json.loads(Path(params["sample_path"]).read_text())))
    count_mismatches = {k: {"product": product.get(k, 0), "baseline": baseline.get(k, 0)}
                        for k in keys if product.get(k, 0) != baseline.get(k, 0)}
    set_differences = {}
    if params.get("full_sets", True):
        start = time.perf_counter()
        rows = connection.execute(
            """
            with product as (
                select members.audience_key, users.user_id
                from main.audience_members as members join raw.users as users using (user_key)
                where members.tenant is null
            ),
            only_product as (select * from product except all select * from bench.baseline_members),
            only_baseline as (select * from bench.baseline_members except all select * from product)
            select audience_key, 'only_product' as side, count(*) from only_product group by 1
            union all
            select audience_key, 'only_baseline', count(*) from only_baseline group by 1
            """
        ).fetchall()
        for key, side, count in rows:
            set_differences.setdefault(key, {})[side] = count
        set_check_s = time.perf_counter() - start
    else:
        set_check_s = None
    sample = {key: set(ids) for key, ids in json.loads(Path(params["sample_path"]).read_text()).items()}
    step = _sample_step(params)
    product_sample: dict[str, set[str]] = {}
    for key, user_id in connection.execute(
        f"""
        select members.audience_key, users.user_id
        from main.audience_members as members join raw.users as users using (user_key)
        where members.tenant is null and users.user_key % {step} = 0
        """
    ).fetchall():
        product_sample.setdefault(key, set()).add(user_id)
    connection.close()
    reference_mismatches = {}
    for key in sorted(set(sample) | set(product_sample)):
        only_reference = sample.get(key, set()) - product_sample.get(key, set())
        only_product = product_sample.get(key, set()) - sample.get(key, set())
        if only_reference or only_product:
            reference_mismatches[key] = {"only_reference": sorted(only_reference)[:5], "only_reference_count": len(only_reference),
                                         "only_product": sorted(only_product)[:5], "only_product_count": len(only_product)}
    return {"count_mismatches": count_mismatches, "set_differences": set_differences, "set_check_s": set_check_s,
            "reference_mismatches": reference_mismatches, "audiences_compared": len(keys),
            "ok": not (count_mismatches or set_differences or reference_mismatches)}


def step_drop_product(params):
    connection = _connect(params)
    relations = connection.execute(
        "select table_schema, table_name, table_type from information_schema.tables "
        "where table_schema in ('main', 'audiences')").fetchall()
    connection.execute("drop schema if exists audiences cascade")
    for schema, name, kind in relations:
        if schema == "main":
            connection.execute(f'drop {"view" if kind == "VIEW" else "table"} if exists main."{name}" cascade')
    connection.execute("checkpoint")
    connection.close()
    return {"dropped": len(relations)}


def step_touch(params):
    connection = _connect(params)
    start = time.perf_counter()
    touched = connection.execute(synthetic.touch_users_sql(params["round"])).fetchone()[0]
    connection.execute("checkpoint")
    connection.close()
    return {"touched": touched, "seconds": time.perf_counter() - start}


def step_preview(params):
    from audiences.definitions import load_definitions
    from audiences.settings import parse_evaluation_time
    from audiences.warehouse import FLATTENED_TABLE, connect, preview, table_exists

    definitions = load_definitions(Path(params["definitions"]))
    now = parse_evaluation_time(params["evaluation_time"])
    connection = connect(Path(params["db"]), read_only=True)
    flattened = table_exists(connection, FLATTENED_TABLE)
    results = {}
    for key in params["keys"]:
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            answer = preview(connection, definitions[key], definitions, now)
            timings.append(time.perf_counter() - start)
        results[key] = {"first_s": timings[0], "second_s": timings[1], "count": answer.count,
                        "inline_json": "raw.users" in answer.sql}
    connection.close()
    return {"flattened_table": flattened, "audiences": results,
            "max_first_s": max(r["first_s"] for r in results.values()),
            "max_second_s": max(r["second_s"] for r in results.values())}


def step_explain(params):
    """EXPLAIN ANALYZE a compiled model (written to a scratch table, as dbt would) under settings."""
    connection = _connect(params)
    for setting, value in (params.get("settings") or {}).items():
        connection.execute(f"set {setting} = '{value}'")
    connection.execute("create schema if not exists bench")
    sql = Path(params["sql_path"]).read_text()
    start = time.perf_counter()
    plan = connection.execute(f"explain analyze create or replace table bench.profile_scratch as {sql}").fetchall()
    seconds = time.perf_counter() - start
    connection.execute("drop table if exists bench.profile_scratch")
    connection.close()
    text = "\n".join(row[-1] for row in plan)
    Path(params["output"]).write_text(text)
    return {"seconds": seconds, "output": params["output"]}


def step_sql(params):
    """Time arbitrary statements (for profiling experiments); returns per-statement seconds."""
    connection = _connect(params, read_only=params.get("read_only", False))
    timings = []
    for statement in params["statements"]:
        start = time.perf_counter()
        rows = connection.execute(statement).fetchall()
        timings.append({"sql": statement[:200], "seconds": time.perf_counter() - start, "rows": rows[:5]})
    connection.close()
    return {"statements": timings}


STEPS = {name[5:]: function for name, function in globals().items() if name.startswith("step_")}


def child_main(step: str, raw_params: str) -> None:
    params = json.loads(raw_params)
    result = STEPS[step](params)
    result["children_maxrss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(params["result_path"]).write_text(json.dumps(result, default=str, indent=1))


# =============================================================================================
# The parent: runs each step in a child process and measures it.


class TreeSampler(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants, sampled from /proc."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self._stop_event = pid, interval, 0, threading.Event()
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _tree_rss(self) -> int:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        tree, frontier = {self.pid}, [self.pid]
        while frontier:
            parent = frontier.pop()
            for pid, ppid in parents.items():
                if ppid == parent and pid not in tree:
                    tree.add(pid)
                    frontier.append(pid)
        total = 0
        for pid in tree:
            try:
                with open(f"/proc/{pid}/statm") as handle:
                    total += int(handle.read().split()[1]) * self.page
            except (OSError, IndexError, ValueError):
                pass
        return total

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self._tree_rss())
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class Size:
    def __init__(self, users: int):
        self.users = users
        self.folder = DATA / str(users)
        self.db = self.folder / "warehouse.duckdb"
        self.project = self.folder / "dbt_project"
        self.results = self.folder / "steps"
        self.logs = self.folder / "logs"
        for folder in (self.folder, self.results, self.logs):
            folder.mkdir(parents=True, exist_ok=True)

    def params(self, **extra) -> dict:
        return {"db": str(self.db), "definitions": str(DEFINITIONS), "project": str(self.project),
                "users": self.users, "sample_path": str(self.results / "reference_sample.json"), **extra}

    def measure(self, label: str, step: str, **extra) -> dict:
        result_path = self.results / f"{label}.json"
        result_path.unlink(missing_ok=True)
        params = self.params(result_path=str(result_path), **extra)
        log_path = self.logs / f"{label}.log"
        load = os.getloadavg()[0]
        start = time.perf_counter()
        with open(log_path, "w") as log:
            process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", step, json.dumps(params)],
                                       cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
                                            "DO_NOT_TRACK": "1"})
            sampler = TreeSampler(process.pid)
            sampler.start()
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        sampler.stop()
        if process.returncode != 0:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"step {label} ({step}) failed with {process.returncode}; log {log_path}:\n{tail}")
        result = json.loads(result_path.read_text())
        result.update(process_wall_s=wall, process_maxrss_mb=usage.ru_maxrss / 1024,
                      tree_peak_rss_mb=sampler.peak / 2**20, load_average_before=load)
        result["peak_rss_mb"] = max(result["process_maxrss_mb"], result["children_maxrss_mb"], result["tree_peak_rss_mb"])
        print(f"  [{self.users:>10,}] {label:<24} {wall:8.1f} s wall   peak {result['peak_rss_mb']:7.0f} MB"
              f"   (load {load:.2f})", flush=True)
        return result


def copy_dbt_project(target: Path) -> None:
    """A fresh copy of the repo's dbt project (no target/ or logs/), so runs never touch the repo's."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(ROOT / "dbt_project", target, ignore=shutil.ignore_patterns("target", "logs", ".user.yml"))


def run_size(users: int, options) -> dict:
    size = Size(users)
    print(f"\n=== {users:,} users ===", flush=True)
    copy_dbt_project(size.project)
    r: dict = {"users": users, "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    r["generate"] = size.measure("generate", "generate")
    r["prepare"] = size.measure("prepare", "prepare")
    r["preview_inline"] = size.measure("preview-inline", "preview", keys=PREVIEW_KEYS, evaluation_time=EVALUATION_TIME)
    r["baseline"] = size.measure("baseline", "baseline", evaluation_time=EVALUATION_TIME)
    r["reference"] = size.measure("reference", "reference", evaluation_time=EVALUATION_TIME)
    r["dbt_noop"] = size.measure("dbt-noop", "dbt_noop")
    r["cold_dbt"] = size.measure("cold-dbt", "product_dbt", evaluation_time=EVALUATION_TIME)
    r["check"] = size.measure("check", "check")
    size.measure("drop-product", "drop_product")
    r["cold_dagster"] = size.measure("cold-dagster", "product_dagster", evaluation_time=EVALUATION_TIME)
    dagster_counts = r["cold_dagster"]["counts"]
    r["check"]["dagster_count_mismatches"] = {
        key: {"dagster": dagster_counts.get(key, 0), "baseline": count}
        for key, count in r["baseline"]["counts"].items() if dagster_counts.get(key, 0) != count}
    r["check"]["ok"] = r["check"]["ok"] and not r["check"]["dagster_count_mismatches"]
    r["preview_fresh"] = size.measure("preview-fresh", "preview", keys=PREVIEW_KEYS, evaluation_time=EVALUATION_TIME)
    r["touch_1"] = size.measure("touch-1", "touch", round=1)
    r["warm_dbt"] = size.measure("warm-dbt", "product_dbt", evaluation_time=later(15))
    r["touch_2"] = size.measure("touch-2", "touch", round=2)
    r["warm_dagster"] = size.measure("warm-dagster", "product_dagster", evaluation_time=later(30))
    r["tick_dbt"] = size.measure("tick-dbt", "product_dbt", evaluation_time=later(45))
    r["profile"] = profile(size, r, options)
    size.measure("cleanup", "sql", statements=["drop table if exists bench.baseline_members", "checkpoint"])
    r["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report_check(r)
    (size.folder / "results.json").write_text(json.dumps(r, indent=1, default=str))
    return r


def profile(size: Size, r: dict, options) -> dict:
    """Where the product's time goes: the slowest models, and EXPLAIN ANALYZE of the slowest one."""
    out: dict = {}
    nodes = r["cold_dbt"]["dbt"]["nodes"]
    slowest = [n for n in nodes if n["unique_id"].startswith("model.")][:1]
    compiled = size.project / "target" / "compiled" / "audiences" / "models"
    for node in slowest:
        name = node["unique_id"].split(".")[-1]
        candidates = list(compiled.rglob(f"{name}.sql"))
        if not candidates or name == "int_users_flattened":
            continue  # an incremental model's compiled SQL depends on the run; profiled by its timings
        out[f"explain_{name}"] = size.measure(f"explain-{name}", "explain", sql_path=str(candidates[0]),
                                              output=str(size.results / f"explain-{name}.txt"))
    return out


def report_check(r: dict) -> None:
    check = r["check"]
    if check["ok"]:
        print(f"  correctness: OK ({check['audiences_compared']} audiences: product == baseline, counts and sets; "
              f"reference sample == product)")
        return
    print("\n" + "!" * 100)
    print(f"!!! CORRECTNESS MISMATCH at {r['users']:,} users")
    for name in ("count_mismatches", "set_differences", "dagster_count_mismatches", "reference_mismatches"):
        if check.get(name):
            print(f"!!! {name}: {json.dumps(check[name], indent=1)[:3000]}")
    print("!" * 100 + "\n")


# =============================================================================================
# Summaries and the report.


def summarize(r: dict) -> dict:
    baseline_s = r["baseline"]["seconds"]
    reference_s = r["reference"]["extrapolated_s"]
    s = {"users": r["users"], "baseline_s": baseline_s, "reference_extrapolated_s": reference_s,
         "baseline_peak_mb": r["baseline"]["peak_rss_mb"], "dbt_startup_s": r["dbt_noop"]["seconds"]}
    for run in ("cold_dbt", "cold_dagster", "warm_dbt", "warm_dagster", "tick_dbt"):
        m = r[run]
        evaluation = m["dbt"]["elapsed_s"]
        s[run] = {"wall_s": m["wall_s"], "evaluation_s": evaluation, "fixed_s": m["wall_s"] - evaluation,
                  "sum_node_s": m["dbt"]["sum_node_s"], "peak_mb": m["peak_rss_mb"],
                  "dbt_maxrss_mb": m["children_maxrss_mb"],
                  "baseline_ratio": baseline_s / evaluation, "reference_ratio": reference_s / evaluation,
                  "baseline_ratio_wall": baseline_s / m["wall_s"], "reference_ratio_wall": reference_s / m["wall_s"]}
    s["preview_fresh_max_s"] = r["preview_fresh"]["max_first_s"]
    s["preview_inline_max_s"] = r["preview_inline"]["max_first_s"]
    s["correct"] = r["check"]["ok"]
    return s


def machine_info() -> dict:
    import dagster
    import dagster_dbt
    import duckdb

    memory = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    dbt_version = subprocess.run([str(Path(sys.executable).parent / "dbt"), "--version"], capture_output=True,
                                 text=True).stdout
    core = next((line.split(":")[-1].strip() for line in dbt_version.splitlines() if "installed" in line), "?")
    plugin = next((line.split(":")[1].split("-")[0].strip() for line in dbt_version.splitlines() if "duckdb:" in line), "?")
    return {"nproc": os.cpu_count(), "memory": f"{int(memory.split()[1]) / 2**20:.1f} GiB", "cpu": cpu,
            "python": platform.python_version(), "duckdb": duckdb.__version__, "dbt_core": core, "dbt_duckdb": plugin,
            "dagster": dagster.__version__, "dagster_dbt": dagster_dbt.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "platform": platform.platform()}


def _mb(value: float) -> str:
    return f"{value:,.0f} MB"


def render_markdown(document: dict) -> str:
    m = document["machine"]
    lines = [
        "# Audience evaluation benchmark",
        "",
        f"Produced by `{document['command']}` on {m['date']}; numbers are single runs on a shared, noisy machine.",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory']} RAM, {m['platform']}. "
        f"Python {m['python']}, DuckDB {m['duckdb']}, dbt-core {m['dbt_core']} + dbt-duckdb {m['dbt_duckdb']}, "
        f"Dagster {m['dagster']} + dagster-dbt {m['dagster_dbt']}.",
        "",
        "What each row is (details in the docstring of `bench/run.py`): *evaluation* is dbt's `elapsed_time` from "
        "`run_results.json` (the build itself); *fixed* is wall minus evaluation (dbt start-up and parse, plus "
        "Dagster's definitions load and run overhead); *peak* is the peak memory of the whole process tree (dbt's "
        "DuckDB included). Baseline: one `insert ... select` per audience reading properties straight from JSON. "
        "Reference: the Python reference evaluator on a ~20k sample, extrapolated. Warm: after touching 1% of users.",
        "",
    ]
    for key in sorted(document["sizes"], key=int):
        r = document["sizes"][key]
        s = summarize(r)
        gen = r["generate"]
        lines += [
            f"## {int(key):,} users",
            "",
            f"{gen['active_users']:,} active users ({gen['users'] - gen['active_users']:,} deleted), "
            f"{gen['json_bytes'] / gen['users']:.0f} bytes of JSON per user, DuckDB file {gen['file_bytes'] / 2**30:.2f} GiB; "
            f"generated in {gen['seconds']:.0f} s. 50 audiences, {r['baseline']['total_members']:,} memberships "
            f"({r['baseline']['total_members'] / gen['active_users'] / 50:.1%} average selectivity). "
            f"Run {r['started_at']} to {r['finished_at']}.",
            "",
            "| measurement | wall | evaluation | fixed cost | peak memory | × baseline | × reference |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        names = {"cold_dbt": "product, cold, `dbt build` (run_dbt)", "cold_dagster": "product, cold, Dagster job",
                 "warm_dbt": "product, warm (1% changed), `dbt build`", "warm_dagster": "product, warm (1% changed), Dagster job",
                 "tick_dbt": "product, schedule tick (no change), `dbt build`"}
        for run, label in names.items():
            x = s[run]
            lines.append(f"| {label} | {x['wall_s']:.1f} s | {x['evaluation_s']:.1f} s | {x['fixed_s']:.1f} s | "
                         f"{_mb(x['peak_mb'])} | {x['baseline_ratio']:.1f}× ({x['baseline_ratio_wall']:.1f}× wall) | "
                         f"{x['reference_ratio']:.0f}× ({x['reference_ratio_wall']:.0f}× wall) |")
        ref = r["reference"]
        lines += [
            f"| dbt start-up alone (`dbt build --select none_such`) | {r['dbt_noop']['seconds']:.1f} s | | | "
            f"{_mb(r['dbt_noop']['peak_rss_mb'])} | | |",
            f"| plain baseline (50 SQL queries on JSON) | {r['baseline']['seconds']:.1f} s | | | "
            f"{_mb(r['baseline']['peak_rss_mb'])} | 1× | |",
            f"| reference evaluator, {ref['sample_users']:,}-user sample | {ref['evaluate_s']:.1f} s "
            f"({ref['per_user_ms']:.3f} ms/user) | | | {_mb(ref['peak_rss_mb'])} | | |",
            f"| reference evaluator, extrapolated to {ref['active_users']:,} | {ref['extrapolated_s']:,.0f} s | | | | | 1× |",
            "",
        ]
        dag_cold = r["cold_dagster"]
        lines += [
            f"Dagster cold run split: definitions load {dag_cold['load_s']:.1f} s, `execute_in_process` "
            f"{dag_cold['execute_s']:.1f} s (steps: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(dag_cold["steps_s"].items())) + "). "
            f"The child processes' own start-up (Python imports) adds {dag_cold['process_wall_s'] - dag_cold['wall_s']:.1f} s.",
            "",
        ]
        pi, pf = r["preview_inline"], r["preview_fresh"]
        lines += ["`preview` (whole call: count, 10-user sample, total), first and second call:", "",
                  "| audience | flattened table absent (inline JSON) | flattened table fresh | members |",
                  "|---|---:|---:|---:|"]
        for audience, fresh in pf["audiences"].items():
            inline = pi["audiences"][audience]
            lines.append(f"| {audience} | {inline['first_s']:.2f} s / {inline['second_s']:.2f} s | "
                         f"{fresh['first_s']:.2f} s / {fresh['second_s']:.2f} s | {fresh['count']:,} |")
        lines.append("")
        check = r["check"]
        if check["ok"]:
            lines.append(f"Correctness: **OK**. Per-audience member counts and member sets of the product (run_dbt) equal the "
                         f"baseline's for all {check['audiences_compared']} audiences; the Dagster run's counts equal them too; "
                         f"the reference evaluator's members on the {ref['sample_users']:,}-user sample equal the product's.")
        else:
            lines.append("Correctness: **MISMATCH** (a bug, see below).")
            for name in ("count_mismatches", "set_differences", "dagster_count_mismatches", "reference_mismatches"):
                if check.get(name):
                    lines.append(f"- {name}: `{json.dumps(check[name])[:1500]}`")
        lines.append("")
        lines += ["Slowest dbt nodes (cold run_dbt | warm run_dbt), seconds:", "", "| node | cold | warm |", "|---|---:|---:|"]
        warm = {n["unique_id"]: n["seconds"] for n in r["warm_dbt"]["dbt"]["nodes"]}
        for node in r["cold_dbt"]["dbt"]["nodes"][:12]:
            lines.append(f"| `{node['unique_id']}` | {node['seconds']:.2f} | {warm.get(node['unique_id'], 0):.2f} |")
        total_nodes = len(r["cold_dbt"]["dbt"]["nodes"])
        lines += [f"| all {total_nodes} nodes (sum; 2 dbt threads) | {r['cold_dbt']['dbt']['sum_node_s']:.2f} | "
                  f"{r['warm_dbt']['dbt']['sum_node_s']:.2f} |", ""]
        slow = sorted(r["baseline"]["per_audience"].items(), key=lambda item: -item[1]["seconds"])[:3]
        lines += ["Baseline: slowest queries " + ", ".join(f"`{k}` {v['seconds']:.2f} s" for k, v in slow)
                  + "; the same filter only counted (no write): "
                  + ", ".join(f"`{k}` {v:.2f} s" for k, v in r["baseline"]["count_only_s"].items()) + ".", ""]
    lines += targets_section(document)
    if ANALYSIS_MD.exists():
        lines += ["", ANALYSIS_MD.read_text().rstrip(), ""]
    return "\n".join(lines) + "\n"


def targets_section(document: dict) -> list[str]:
    lines = ["## Targets", "", "| target | size | measured | met? |", "|---|---|---|---|"]
    for key in sorted(document["sizes"], key=int):
        s = summarize(document["sizes"][key])
        n = f"{int(key):,}"
        for run in ("cold_dbt", "warm_dbt", "cold_dagster", "warm_dagster"):
            x = s[run]
            lines.append(f"| evaluation ≥ 10× faster than baseline ({run}) | {n} | {x['baseline_ratio']:.1f}× | "
                         f"{'yes' if x['baseline_ratio'] >= TARGETS['baseline_ratio'] else '**no**'} |")
            lines.append(f"| evaluation ≥ 200× faster than reference ({run}) | {n} | {x['reference_ratio']:.0f}× | "
                         f"{'yes' if x['reference_ratio'] >= TARGETS['reference_ratio'] else '**no**'} |")
        peak = max(s[run]["peak_mb"] for run in ("cold_dbt", "warm_dbt", "cold_dagster", "warm_dagster"))
        lines.append(f"| peak memory < 2 GB (at 10M) | {n} | {_mb(peak)} | "
                     f"{'yes' if peak < TARGETS['peak_memory_mb_10m'] else '**no**'} |")
        lines.append(f"| `preview` < 1 s (at 1M), flattened fresh | {n} | {s['preview_fresh_max_s']:.2f} s (slowest of 5) | "
                     f"{'yes' if s['preview_fresh_max_s'] < TARGETS['preview_s_1m'] else '**no**'} |")
        lines.append(f"| (information) `preview` with the flattened table absent | {n} | {s['preview_inline_max_s']:.2f} s | |")
    return lines


def write_report(sizes: dict[int, dict], command: str) -> None:
    document = {"command": command, "machine": machine_info(), "sizes": {}}
    if RESULTS_JSON.exists():
        previous = json.loads(RESULTS_JSON.read_text())
        document["sizes"].update(previous.get("sizes", {}))
    document["sizes"].update({str(users): r for users, r in sizes.items()})
    document["summary"] = {key: summarize(r) for key, r in document["sizes"].items()}
    RESULTS_JSON.write_text(json.dumps(document, indent=1, default=str))
    RESULTS_MD.write_text(render_markdown(document))
    print(f"\nwrote {RESULTS_MD} and {RESULTS_JSON}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--quick", action="store_true", help="100k users, a smoke test; results stay in bench/data/")
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md from results.json")
    options = parser.parse_args()
    command = ".venv/bin/python bench/run.py " + " ".join(sys.argv[1:])
    if options.report_only:
        document = json.loads(RESULTS_JSON.read_text())
        RESULTS_MD.write_text(render_markdown(document))
        return
    DATA.mkdir(parents=True, exist_ok=True)
    synthetic.write_definitions(DEFINITIONS)
    SOURCES_FILE.write_text("# The benchmark loads users straight into raw.users: no sources.\nsources: []\n")
    sizes = [100_000] if options.quick else options.users
    results = {}
    for users in sizes:
        results[users] = run_size(users, options)
        s = summarize(results[users])
        print(f"  cold: evaluation {s['cold_dbt']['evaluation_s']:.1f} s, baseline {s['baseline_s']:.1f} s "
              f"({s['cold_dbt']['baseline_ratio']:.1f}×), reference extrapolated {s['reference_extrapolated_s']:.0f} s "
              f"({s['cold_dbt']['reference_ratio']:.0f}×), peak {s['cold_dbt']['peak_mb']:.0f} MB")
    if options.quick:
        quick = DATA / "quick-results.md"
        document = {"command": command, "machine": machine_info(), "sizes": {str(k): v for k, v in results.items()}}
        (DATA / "quick-results.json").write_text(json.dumps(document, indent=1, default=str))
        quick.write_text(render_markdown(document))
        print(f"\nwrote {quick}")
    else:
        write_report(results, command)


if __name__ == "__main__":
    main()
