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
   through `audiences.dbt.project.run_dbt` and once through Dagster itself (the `reevaluate_audiences`
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
   `audiences/warehouse/queries.py` does when there is no flattened table), writing (audience_key, user_id).
4. Reference evaluator (`audiences.conditions.reference.evaluate_audience`) on a ~20k-user sample,
   extrapolated linearly to the full size (evaluation time only, not JSON parsing: the conservative
   choice for the product's ratio).
5. `preview` (`audiences.warehouse.queries.preview`) of 5 audiences, with `int_users_flattened` absent (inline
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
from datetime import UTC, datetime, timedelta
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
PREVIEW_INLINE_MAX_USERS = 1_000_000
PREVIEW_KEYS = [
    "churn-risk",
    "eu-customers",
    "beta-testers",
    "annual-renewal-soon",
    "nps-promoters",
]
TARGETS = {
    "baseline_ratio": 10,
    "reference_ratio": 200,
    "peak_memory_mb_10m": 2048,
    "preview_s_1m": 1.0,
}


def later(minutes: int) -> str:
    base = datetime.fromisoformat(EVALUATION_TIME.replace("Z", "+00:00"))
    return (base + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


# =============================================================================================
# Child steps: each runs in its own process and returns a JSON-able dict.


def _settings(params):
    from audiences.settings import Settings

    return Settings.from_env(
        duckdb_path=params["db"],
        definitions_dir=params["definitions"],
        dbt_project_dir=params["project"],
        sources_file=str(SOURCES_FILE),
    )


def _connect(params, read_only=False):
    from audiences.warehouse.queries import connect

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
    return {
        "seconds": seconds,
        "users": total,
        "active_users": active,
        "json_bytes": size,
        "file_bytes": db.stat().st_size,
    }


def step_prepare(params):
    from audiences.dbt.project import generate, prepare

    start = time.perf_counter()
    generate(_settings(params))  # loading the code location only checks the models
    manifest = prepare(_settings(params))
    return {"seconds": time.perf_counter() - start, "manifest": str(manifest)}


def step_dbt_noop(params):
    """dbt's start-up: a build that selects nothing (optionally with new --vars, which forces a full parse)."""
    from audiences.dbt.project import run_dbt

    arguments = ["build", "--select", "none_such"]
    if params.get("evaluation_time"):
        arguments += ["--vars", json.dumps({"evaluation_time": params["evaluation_time"]})]
    start = time.perf_counter()
    result = run_dbt(arguments, _settings(params))
    seconds = time.perf_counter() - start
    phases = (
        dbt_phases(Path(os.environ["DBT_LOG_PATH"]) / "dbt.log")
        if os.environ.get("DBT_LOG_PATH")
        else {}
    )
    return {"seconds": seconds, "phases": phases, "stdout_tail": result.stdout[-300:]}


def _run_results(path: Path) -> dict:
    document = json.loads(path.read_text())
    nodes = [
        {
            "unique_id": r["unique_id"],
            "status": r["status"],
            "seconds": r["execution_time"],
            "rows": (r.get("adapter_response") or {}).get("rows_affected"),
        }
        for r in document["results"]
    ]
    statuses = {}
    for node in nodes:
        statuses[node["status"]] = statuses.get(node["status"], 0) + 1
    return {
        "path": str(path),
        "elapsed_s": document["elapsed_time"],
        "sum_node_s": sum(n["seconds"] for n in nodes),
        "nodes": sorted(nodes, key=lambda n: -n["seconds"]),
        "statuses": statuses,
    }


def dbt_phases(log_file: Path) -> dict:
    """Start-up phases of the last dbt invocation in a dbt.log (text or JSON lines), in seconds.

    import_to_version: not visible here (process start to the first line); adapter: version line to
    adapter registered; parse: adapter registered to "Found N models" (a full parse when dbt says
    "Unable to do partial parsing"); execute: "Concurrency" to "Finished running"; total: first to
    last line.
    """
    import re

    if not log_file.exists():
        return {}
    events = []
    for line in log_file.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                info = json.loads(line)["info"]
            except (ValueError, KeyError):
                continue
            moment = datetime.fromisoformat(info["ts"].replace("Z", "+00:00")).timestamp()
            events.append((moment, info.get("msg", "")))
        else:
            match = re.match(r"(?:\x1b\[0m)?(\d\d):(\d\d):(\d\d\.\d+) \[", line)
            if match:
                hours, minutes, seconds = match.groups()
                events.append(
                    (int(hours) * 3600 + int(minutes) * 60 + float(seconds), line[match.end() :])
                )
    starts = [i for i, (_, message) in enumerate(events) if "Running with dbt=" in message]
    if not starts:
        return {}
    events = events[starts[-1] :]

    def first(text):
        return next((moment for moment, message in events if text in message), None)

    begin, adapter, found = events[0][0], first("Registered adapter"), first("Found ")
    concurrency, end = first("Concurrency:"), events[-1][0]
    finished = next(
        (moment for moment, message in events if re.search(r"Finished running \d", message)), None
    )
    phases = {
        "full_parse": any("Unable to do partial parsing" in m for _, m in events),
        "total_s": end - begin,
        "begin_ts": begin,
        "end_ts": end,
    }
    if adapter and found:
        phases.update(adapter_s=adapter - begin, parse_s=found - adapter)
    if concurrency and finished:
        phases.update(execute_s=finished - concurrency, after_s=end - finished)
    return phases


def _product_counts(params) -> dict:
    connection = _connect(params, read_only=True)
    try:
        counts = dict(
            connection.execute(
                "select audience_key, count(*) from main.audience_members where tenant is null group by 1"
            ).fetchall()
        )
        flattened = connection.execute("select count(*) from main.int_users_flattened").fetchone()[
            0
        ]
    finally:
        connection.close()
    return {"counts": counts, "total_members": sum(counts.values()), "flattened_rows": flattened}


def asset_invocation() -> str:
    """How the Dagster asset `audience_models` hands the evaluation time to dbt, read from its source.

    "clock": it writes raw.evaluation_clock, then runs a plain `dbt build`; "vars": it runs
    `dbt build --vars {"evaluation_time": ...}`. The run_dbt measurement does the same.
    """
    source = (ROOT / "pipelines" / "defs" / "audiences.py").read_text()
    return "clock" if "set_evaluation_clock(" in source else "vars"


def step_product_dbt(params):
    from audiences.dbt.project import run_dbt
    from audiences.settings import parse_evaluation_time

    settings = _settings(params)
    invocation = params.get("invocation") or asset_invocation()
    start = time.perf_counter()
    if invocation == "clock":
        from audiences.warehouse.evaluation import set_evaluation_clock

        connection = _connect(params)
        set_evaluation_clock(connection, parse_evaluation_time(params["evaluation_time"]))
        connection.close()
        arguments = ["build"]
    else:
        arguments = ["build", "--vars", json.dumps({"evaluation_time": params["evaluation_time"]})]
    arguments += params.get("extra_arguments", [])
    run_dbt(arguments, settings)
    wall = time.perf_counter() - start
    target = settings.dbt_project_dir / "target"
    run_results = _run_results(target / "run_results.json")
    # Keep this run's compiled SQL of the big models, for EXPLAIN ANALYZE later.
    compiled = {}
    for name in ("int_users_flattened", "audience_members"):
        for source in (target / "compiled").rglob(f"{name}.sql"):
            copy = Path(params["result_path"]).with_name(
                f"{Path(params['result_path']).stem}-{name}.sql"
            )
            shutil.copyfile(source, copy)
            compiled[name] = str(copy)
    phases = (
        dbt_phases(Path(os.environ["DBT_LOG_PATH"]) / "dbt.log")
        if os.environ.get("DBT_LOG_PATH")
        else {}
    )
    return {
        "wall_s": wall,
        "invocation": invocation,
        "arguments": arguments,
        "dbt": run_results,
        "phases": phases,
        "compiled": compiled,
        **_product_counts(params),
    }


def step_product_dagster(params):
    # The settings reach Dagster's definitions through these variables, set before the import.
    os.environ.update(
        {
            "AUDIENCES_DUCKDB": params["db"],
            "AUDIENCES_DEFINITIONS": params["definitions"],
            "AUDIENCES_DBT_PROJECT": params["project"],
            "AUDIENCES_SOURCES": str(SOURCES_FILE),
        }
    )
    start = time.perf_counter()
    import dagster as dg

    from pipelines.definitions import defs

    job = defs.resolve_job_def("reevaluate_audiences")
    # The evaluation: the definitions asset, the dbt assets and their checks. Assets downstream of
    # the evaluation (membership events, publishing, deliveries) are not part of it.
    evaluation_ops = {"audience_definitions", "audience_models"}
    selection = sorted(
        {
            key
            for assets in defs.assets
            if isinstance(assets, dg.AssetsDefinition) and assets.op.name in evaluation_ops
            for key in assets.keys
        },
        key=str,
    )
    loaded = time.perf_counter()
    instance = dg.DagsterInstance.ephemeral()
    result = job.execute_in_process(
        run_config={
            "ops": {"audience_models": {"config": {"evaluation_time": params["evaluation_time"]}}}
        },
        instance=instance,
        asset_selection=selection,
    )
    finished = time.perf_counter()
    if not result.success:
        raise RuntimeError("the Dagster run failed")
    steps = {
        s.step_key: s.end_time - s.start_time
        for s in instance.get_run_step_stats(result.run_id)
        if s.end_time and s.start_time
    }
    target = Path(params["project"]) / "target"
    candidates = sorted(
        target.glob(f"*{result.run_id[:7]}*/run_results.json"), key=lambda p: p.stat().st_mtime
    )
    run_results = _run_results(candidates[-1])
    phases = dbt_phases(candidates[-1].parent / "dbt.log")
    models_step = next(
        (s for s in instance.get_run_step_stats(result.run_id) if s.step_key == "audience_models"),
        None,
    )
    if phases and models_step:
        # dagster-dbt's own work around the dbt process (selection, adapter, events, member counts)
        phases["dagster_before_dbt_s"] = phases["begin_ts"] - models_step.start_time
        phases["dagster_after_dbt_s"] = models_step.end_time - phases["end_ts"]
    all_keys = {
        str(key)
        for assets in defs.assets
        if isinstance(assets, dg.AssetsDefinition)
        for key in assets.keys
    }
    return {
        "load_s": loaded - start,
        "execute_s": finished - loaded,
        "wall_s": finished - start,
        "steps_s": steps,
        "dbt": run_results,
        "phases": phases,
        "selected_assets": len(selection),
        "not_selected": sorted(all_keys - {str(key) for key in selection}),
        **_product_counts(params),
    }


def _baseline_context(now):
    from sqlglot import exp

    from audiences.conditions.compiler import (
        CompileContext,
        attribute_expression,
        property_json,
        timestamp_literal,
    )

    properties, identifier = (
        exp.column("properties", table="users"),
        exp.column("user_id", table="users"),
    )
    return CompileContext(
        attribute=lambda a: attribute_expression(
            property_json(a.path, properties, identifier), a.variant
        ),
        audience_members=lambda key: (
            exp.select("user_id")
            .from_("bench.baseline_members")
            .where(exp.column("audience_key").eq(exp.Literal.string(key)))
        ),
        evaluation_time=timestamp_literal(now),
        user_key=identifier,  # memberships are kept by user id
        user_id=identifier,
    )


def _lean_query(definition, now, table: str):
    """FROM clause and context reading each user's JSON once per query (one json_extract of a path list)."""
    from sqlglot import exp

    from audiences.conditions.compiler import (
        CompileContext,
        attribute_expression,
        attributes_used,
        json_pointer,
        render,
        timestamp_literal,
    )

    paths = sorted({a.path for a in attributes_used(definition.segments) if a.path != ("id",)})
    position = {path: index + 1 for index, path in enumerate(paths)}
    values, identifier = (
        exp.column("property_values", table="users"),
        exp.column("user_id", table="users"),
    )

    def attribute(a):
        if a.path == ("id",):
            return attribute_expression(exp.func("to_json", identifier), a.variant)
        return attribute_expression(
            exp.func("list_extract", values, exp.Literal.number(position[a.path])), a.variant
        )

    pointers = exp.Array(expressions=[exp.Literal.string(json_pointer(path)) for path in paths])
    extraction = render(pointers, pretty=False) if paths else "cast([] as varchar[])"
    source = (
        f"(select user_id, json_extract(properties, {extraction}) as property_values "
        f"from raw.users where deleted_at is null) as users"
    )
    context = CompileContext(
        attribute=attribute,
        audience_members=lambda key: (
            exp.select("user_id")
            .from_(table)
            .where(exp.column("audience_key").eq(exp.Literal.string(key)))
        ),
        evaluation_time=timestamp_literal(now),
        user_key=identifier,
        user_id=identifier,
    )
    return source, context


def step_baseline(params):
    """The plain baseline: one insert per audience straight over raw.users' JSON.

    variant "inline": every attribute read is its own JSON extraction, exactly the SQL that
    `audiences/warehouse/queries.py` runs without a flattened table. variant "lean": each user's document is
    parsed once per query (json_extract of the list of paths the audience reads), then the same
    compiled conditions.
    """
    from sqlglot import exp

    from audiences.conditions.compiler import compile_segments, render
    from audiences.conditions.definitions import evaluation_order, load_definitions
    from audiences.settings import parse_evaluation_time

    definitions = load_definitions(Path(params["definitions"]))
    now = parse_evaluation_time(params["evaluation_time"])
    variant = params.get("variant", "inline")
    table = "bench.baseline_members" if variant == "inline" else f"bench.baseline_{variant}_members"
    context = _baseline_context(now)
    connection = _connect(params)
    connection.execute("create schema if not exists bench")
    connection.execute(f"drop table if exists {table}")
    connection.execute(f"create table {table} (audience_key varchar, user_id varchar)")
    per_audience, start = {}, time.perf_counter()
    for key in evaluation_order(definitions):
        if variant == "inline":
            condition = render(compile_segments(definitions[key].segments, context))
            source, where = "raw.users as users", f"users.deleted_at is null and ({condition})"
        else:
            source, lean_context = _lean_query(definitions[key], now, table)
            where = render(compile_segments(definitions[key].segments, lean_context))
        sql = (
            f"insert into {table} select {render(exp.Literal.string(key))}, users.user_id "
            f"from {source} where {where}"
        )
        began = time.perf_counter()
        rows = connection.execute(sql).fetchone()[0]
        per_audience[key] = {"seconds": time.perf_counter() - began, "rows": rows}
    seconds = time.perf_counter() - start
    connection.execute("checkpoint")
    checkpointed = time.perf_counter() - start
    counts = {key: value["rows"] for key, value in per_audience.items()}
    read_only = {}
    if variant == "inline":
        # What a baseline query costs without writing: the same filter, counted (three examples) ...
        for key in ("free-plan", "churn-risk", "northern-high-value"):
            condition = render(compile_segments(definitions[key].segments, context))
            began = time.perf_counter()
            connection.execute(
                f"select count(*) from raw.users as users where users.deleted_at is null and ({condition})"
            ).fetchone()
            read_only[key] = time.perf_counter() - began
        # ... and one plain pass of JSON parsing over every user, the floor of any query on JSON.
        began = time.perf_counter()
        connection.execute(
            "select count(*) from raw.users where json_extract(properties, '/plan') is not null"
        ).fetchone()
        read_only["one JSON parse of every user"] = time.perf_counter() - began
    else:
        mismatches = {}
        reference = (
            dict(
                connection.execute(
                    "select audience_key, count(*) from bench.baseline_members group by 1"
                ).fetchall()
            )
            if params.get("compare", True)
            else {}
        )
        for key, count in counts.items():
            if reference and reference.get(key, 0) != count:
                mismatches[key] = {"lean": count, "inline": reference.get(key, 0)}
        read_only["mismatches_vs_inline"] = mismatches
        connection.execute(f"drop table {table}")
    connection.close()
    return {
        "seconds": seconds,
        "with_checkpoint_s": checkpointed,
        "per_audience": per_audience,
        "counts": counts,
        "total_members": sum(counts.values()),
        "count_only_s": read_only,
    }


def _sample_step(params) -> int:
    return max(1, params["users"] // REFERENCE_SAMPLE)


def step_reference(params):
    from audiences.conditions.definitions import evaluation_order, load_definitions
    from audiences.conditions.reference import evaluate_audience
    from audiences.settings import parse_evaluation_time

    definitions = load_definitions(Path(params["definitions"]))
    now = parse_evaluation_time(params["evaluation_time"])
    connection = _connect(params, read_only=True)
    step = _sample_step(params)
    start = time.perf_counter()
    rows = connection.execute(
        f"select user_id, properties from raw.users where deleted_at is null and user_key % {step} = 0 order by user_key"
    ).fetchall()
    active = connection.execute(
        "select count(*) from raw.users where deleted_at is null"
    ).fetchone()[0]
    connection.close()
    read = time.perf_counter()
    users = [{**json.loads(properties), "id": user_id} for user_id, properties in rows]
    parsed = time.perf_counter()
    members: dict[str, set[str]] = {}
    is_member = lambda key, user_id: user_id in members.get(key, ())  # noqa: E731
    for key in evaluation_order(definitions):
        audience = definitions[key].raw
        members[key] = {
            user["id"]
            for user in users
            if evaluate_audience(audience, user, now=now, is_member=is_member)
        }
    evaluated = time.perf_counter()
    sample_path = Path(params["sample_path"])
    sample_path.write_text(json.dumps({key: sorted(ids) for key, ids in members.items()}))
    evaluate_s = evaluated - parsed
    scale = active / len(users)
    return {
        "sample_users": len(users),
        "active_users": active,
        "sample_step": step,
        "read_s": read - start,
        "parse_s": parsed - read,
        "evaluate_s": evaluate_s,
        "per_user_ms": 1000 * evaluate_s / len(users),
        "extrapolated_s": evaluate_s * scale,
        "extrapolated_with_parse_s": (evaluate_s + parsed - read) * scale,
        "sample_members": sum(len(v) for v in members.values()),
    }


def step_check(params):
    """Baseline vs product (counts and sets), reference sample vs product."""
    connection = _connect(params, read_only=True)
    product = dict(
        connection.execute(
            "select audience_key, count(*) from main.audience_members where tenant is null group by 1"
        ).fetchall()
    )
    baseline = dict(
        connection.execute(
            "select audience_key, count(*) from bench.baseline_members group by 1"
        ).fetchall()
    )
    keys = sorted(
        set(product) | set(baseline) | set(json.loads(Path(params["sample_path"]).read_text()))
    )
    count_mismatches = {
        k: {"product": product.get(k, 0), "baseline": baseline.get(k, 0)}
        for k in keys
        if product.get(k, 0) != baseline.get(k, 0)
    }
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
    sample = {
        key: set(ids) for key, ids in json.loads(Path(params["sample_path"]).read_text()).items()
    }
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
            reference_mismatches[key] = {
                "only_reference": sorted(only_reference)[:5],
                "only_reference_count": len(only_reference),
                "only_product": sorted(only_product)[:5],
                "only_product_count": len(only_product),
            }
    return {
        "count_mismatches": count_mismatches,
        "set_differences": set_differences,
        "set_check_s": set_check_s,
        "reference_mismatches": reference_mismatches,
        "audiences_compared": len(keys),
        "ok": not (count_mismatches or set_differences or reference_mismatches),
    }


def step_drop_product(params):
    connection = _connect(params)
    relations = connection.execute(
        "select table_schema, table_name, table_type from information_schema.tables "
        "where table_schema in ('main', 'audiences')"
    ).fetchall()
    connection.execute("drop schema if exists audiences cascade")
    for schema, name, kind in relations:
        if schema == "main":
            connection.execute(
                f'drop {"view" if kind == "VIEW" else "table"} if exists main."{name}" cascade'
            )
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
    from audiences.conditions.definitions import load_definitions
    from audiences.settings import parse_evaluation_time
    from audiences.warehouse.queries import FLATTENED_TABLE, connect, preview, table_exists

    definitions = load_definitions(Path(params["definitions"]))
    now = parse_evaluation_time(params["evaluation_time"])
    connection = connect(Path(params["db"]), read_only=True)
    flattened = table_exists(connection, FLATTENED_TABLE)
    results = {}
    for key in params["keys"]:
        timings = []
        for _ in range(params.get("repeat", 2)):
            start = time.perf_counter()
            answer = preview(connection, definitions[key], definitions, now)
            timings.append(time.perf_counter() - start)
        results[key] = {
            "first_s": timings[0],
            "second_s": timings[-1],
            "count": answer.count,
            "inline_json": "raw.users" in answer.sql,
        }
    connection.close()
    return {
        "flattened_table": flattened,
        "audiences": results,
        "max_first_s": max(r["first_s"] for r in results.values()),
        "max_second_s": max(r["second_s"] for r in results.values()),
        "repeat": params.get("repeat", 2),
    }


def step_explain(params):
    """EXPLAIN ANALYZE a compiled model (written to a scratch table, as dbt would) under settings."""
    connection = _connect(params)
    for setting, value in (params.get("settings") or {}).items():
        connection.execute(f"set {setting} = '{value}'")
    connection.execute("create schema if not exists bench")
    sql = Path(params["sql_path"]).read_text()
    profile_path = Path(params["output"]).with_suffix(".json")
    connection.execute("set enable_profiling = 'json'")
    connection.execute(f"set profiling_output = '{profile_path}'")
    start = time.perf_counter()
    connection.execute(f"create or replace table bench.profile_scratch as {sql}")
    seconds = time.perf_counter() - start
    connection.execute("set enable_profiling = 'no_output'")
    connection.execute("drop table if exists bench.profile_scratch")
    connection.close()
    profile = json.loads(profile_path.read_text())
    operators = []

    def walk(node, depth=0):
        info = node.get("extra_info") or {}
        what = info.get("Table") or info.get("Conditions") or info.get("Join Type") or ""
        if "Projections" in info:
            what = f"{len(info['Projections'])} projections: " + ", ".join(
                map(str, info["Projections"][:6])
            )
        operators.append(
            {
                "operator": node.get("name"),
                "cpu_s": node.get("timing", 0),
                "rows": node.get("intermediate_rows"),
                "depth": depth,
                "detail": str(what)[:160],
            }
        )
        for child in node.get("children", []):
            walk(child, depth + 1)

    for node in profile.get("operator", []):
        walk(node)
    total_cpu = sum(o["cpu_s"] for o in operators)
    top = sorted(operators, key=lambda o: -o["cpu_s"])[:8]
    system = profile.get("system", {})
    lines = [
        f"wall {seconds:.2f} s, operator CPU {total_cpu:.2f} s, checkpoint {profile.get('storage', {}).get('checkpoint_latency', 0):.2f} s, "
        f"peak buffer memory {system.get('peak_buffer_memory', 0) / 2**20:.0f} MB"
    ]
    lines += [f"{o['cpu_s']:7.2f} s {o['operator']} rows={o['rows']} {o['detail']}" for o in top]
    Path(params["output"]).write_text("\n".join(lines) + "\n")
    return {
        "seconds": seconds,
        "output": params["output"],
        "operator_cpu_s": total_cpu,
        "top": top,
        "checkpoint_s": profile.get("storage", {}).get("checkpoint_latency"),
        "peak_buffer_mb": system.get("peak_buffer_memory", 0) / 2**20,
    }


def step_sql(params):
    """Time arbitrary statements (for profiling experiments); returns per-statement seconds."""
    connection = _connect(params, read_only=params.get("read_only", False))
    timings = []
    for statement in params["statements"]:
        start = time.perf_counter()
        rows = connection.execute(statement).fetchall()
        timings.append(
            {"sql": statement[:200], "seconds": time.perf_counter() - start, "rows": rows[:5]}
        )
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


def bench_environment(size) -> dict[str, str]:
    """Everything the product reads or writes stays under bench/data/ (store, sinks, workflows)."""
    return {
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DO_NOT_TRACK": "1",
        "AUDIENCES_DUCKDB": str(size.db),
        "AUDIENCES_DEFINITIONS": str(DEFINITIONS),
        "AUDIENCES_DBT_PROJECT": str(size.project),
        "AUDIENCES_SOURCES": str(SOURCES_FILE),
        "AUDIENCES_STORE_URL": f"sqlite:///{size.folder / 'store.sqlite'}",
        "AUDIENCES_SINKS": str(DATA / "sinks.yml"),
        "AUDIENCES_WORKFLOWS": str(DATA / "workflows"),
        "AUDIENCES_SYNCS": str(DATA / "syncs.yml"),
        "AUDIENCES_GUIDES": str(DATA / "guides"),
    }


PRODUCT_FILES = (
    "audiences",
    "pipelines",
    "dbt_project/models",
    "dbt_project/macros",
    "dbt_project/dbt_project.yml",
    "dbt_project/profiles.yml",
)


def product_state() -> dict[str, float]:
    """Modification times of the product's source files (other people edit them while we measure)."""
    state = {}
    for entry in PRODUCT_FILES:
        path = ROOT / entry
        files = (
            [path]
            if path.is_file()
            else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        for file in files:
            state[str(file.relative_to(ROOT))] = file.stat().st_mtime
    return state


def product_fingerprint() -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(product_state()):
        digest.update(name.encode())
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()[:16]


class Size:
    def __init__(self, users: int, resume: bool = False):
        self.users, self.resume = users, resume
        self.folder = DATA / str(users)
        self.db = self.folder / "warehouse.duckdb"
        self.project = self.folder / "dbt_project"
        self.results = self.folder / "steps"
        self.logs = self.folder / "logs"
        for folder in (self.folder, self.results, self.logs):
            folder.mkdir(parents=True, exist_ok=True)

    def params(self, **extra) -> dict:
        return {
            "db": str(self.db),
            "definitions": str(DEFINITIONS),
            "project": str(self.project),
            "users": self.users,
            "sample_path": str(self.results / "reference_sample.json"),
            **extra,
        }

    def measure(self, label: str, step: str, **extra) -> dict:
        measured_path = self.results / f"{label}.measured.json"
        if self.resume and measured_path.exists():
            result = json.loads(measured_path.read_text())
            result["resumed"] = True
            print(
                f"  [{self.users:>10,}] {label:<24} (measured earlier, {result.get('measured_at')}: reused)",
                flush=True,
            )
            return result
        self.resume = False  # steps run in order: once one runs again, every later one does too
        measured_path.unlink(missing_ok=True)
        result_path = self.results / f"{label}.json"
        result_path.unlink(missing_ok=True)
        params = self.params(result_path=str(result_path), **extra)
        log_path = self.logs / f"{label}.log"
        load = os.getloadavg()[0]
        start = time.perf_counter()
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--child",
                    step,
                    json.dumps(params),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    **bench_environment(self),
                    "DBT_LOG_PATH": str(self.logs / f"dbt-{label}"),
                },
            )
            sampler = TreeSampler(process.pid)
            sampler.start()
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        sampler.stop()
        if process.returncode != 0:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(
                f"step {label} ({step}) failed with {process.returncode}; log {log_path}:\n{tail}"
            )
        result = json.loads(result_path.read_text())
        result.update(
            process_wall_s=wall,
            process_maxrss_mb=usage.ru_maxrss / 1024,
            tree_peak_rss_mb=sampler.peak / 2**20,
            load_average_before=load,
        )
        result["peak_rss_mb"] = max(
            result["process_maxrss_mb"], result["children_maxrss_mb"], result["tree_peak_rss_mb"]
        )
        result["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        measured_path.write_text(json.dumps(result, indent=1, default=str))
        print(
            f"  [{self.users:>10,}] {label:<24} {wall:8.1f} s wall   peak {result['peak_rss_mb']:7.0f} MB"
            f"   (load {load:.2f})",
            flush=True,
        )
        return result


def copy_dbt_project(target: Path) -> None:
    """A fresh copy of the repo's dbt project (no target/ or logs/), so runs never touch the repo's.

    Hand-written SQL audiences (models/audiences/custom/) are left out: the benchmark's audience set
    is the 50 generated definitions, which the baseline and the reference evaluator also evaluate.
    """
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(
        ROOT / "dbt_project", target, ignore=shutil.ignore_patterns("target", "logs", ".user.yml")
    )
    custom = target / "models" / "audiences" / "custom"
    if custom.exists():
        shutil.rmtree(custom)


def run_size(users: int, options) -> dict:
    """Every measurement of one size, in order. With --resume, a size whose results.json is complete is
    reused, and otherwise steps measured before an interruption are reused up to the first missing one
    (the data they left behind is the data the next step needs)."""
    size = Size(users, resume=options.resume)
    complete = size.folder / "results.json"
    if options.resume and complete.exists():
        print(
            f"\n=== {users:,} users: complete results of {json.loads(complete.read_text())['started_at']} reused ==="
        )
        return json.loads(complete.read_text())
    print(f"\n=== {users:,} users ===", flush=True)
    if not (options.resume and (size.results / "generate.measured.json").exists()):
        size.resume = False
        copy_dbt_project(size.project)
    r: dict = {
        "users": users,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "product_fingerprint": product_fingerprint(),
        "invocation": asset_invocation(),
    }
    state_before = product_state()
    (size.folder / "store.sqlite").unlink(missing_ok=True)
    r["generate"] = size.measure("generate", "generate")
    r["prepare"] = size.measure("prepare", "prepare")
    if users <= PREVIEW_INLINE_MAX_USERS:  # inline JSON preview takes minutes beyond that
        r["preview_inline"] = size.measure(
            "preview-inline",
            "preview",
            keys=PREVIEW_KEYS,
            evaluation_time=EVALUATION_TIME,
            repeat=2 if users <= 100_000 else 1,
        )
    r["baseline"] = size.measure("baseline", "baseline", evaluation_time=EVALUATION_TIME)
    r["baseline_lean"] = size.measure(
        "baseline-lean", "baseline", evaluation_time=EVALUATION_TIME, variant="lean"
    )
    r["reference"] = size.measure("reference", "reference", evaluation_time=EVALUATION_TIME)
    r["dbt_noop"] = size.measure("dbt-noop", "dbt_noop")
    r["cold_dbt"] = size.measure("cold-dbt", "product_dbt", evaluation_time=EVALUATION_TIME)
    r["check"] = size.measure("check", "check")
    size.measure("drop-product", "drop_product")
    r["cold_dagster"] = size.measure(
        "cold-dagster", "product_dagster", evaluation_time=EVALUATION_TIME
    )
    dagster_counts = r["cold_dagster"]["counts"]
    r["check"]["dagster_count_mismatches"] = {
        key: {"dagster": dagster_counts.get(key, 0), "baseline": count}
        for key, count in r["baseline"]["counts"].items()
        if dagster_counts.get(key, 0) != count
    }
    r["check"]["ok"] = r["check"]["ok"] and not r["check"]["dagster_count_mismatches"]
    r["preview_fresh"] = size.measure(
        "preview-fresh", "preview", keys=PREVIEW_KEYS, evaluation_time=EVALUATION_TIME
    )
    r["touch_1"] = size.measure("touch-1", "touch", round=1)
    r["warm_dbt"] = size.measure("warm-dbt", "product_dbt", evaluation_time=later(15))
    r["touch_2"] = size.measure("touch-2", "touch", round=2)
    r["warm_dagster"] = size.measure("warm-dagster", "product_dagster", evaluation_time=later(30))
    r["tick_dbt"] = size.measure("tick-dbt", "product_dbt", evaluation_time=later(45))
    r["tick_dagster"] = size.measure("tick-dagster", "product_dagster", evaluation_time=later(60))
    # Last, because new --vars leave dbt's partial-parse state changed for the next command.
    r["dbt_noop_vars"] = size.measure("dbt-noop-vars", "dbt_noop", evaluation_time=later(5))
    r["profile"] = profile(size, r, options)
    size.measure(
        "cleanup", "sql", statements=["drop table if exists bench.baseline_members", "checkpoint"]
    )
    r["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    state_after = product_state()
    r["product_changed_during_run"] = sorted(
        name
        for name in set(state_before) | set(state_after)
        if state_before.get(name) != state_after.get(name)
    )
    if r["product_changed_during_run"]:
        print(
            f"  NOTE: product files changed while measuring: {', '.join(r['product_changed_during_run'][:12])}"
        )
    report_check(r)
    (size.folder / "results.json").write_text(json.dumps(r, indent=1, default=str))
    return r


def profile(size: Size, r: dict, options) -> dict:
    """Where the product's time goes: EXPLAIN ANALYZE of the two big models, as compiled by the cold run.

    Each is written to a scratch table like dbt does, in its own process (so its memory is known too).
    """
    out: dict = {}
    for name, path in r["cold_dbt"].get("compiled", {}).items():
        out[name] = size.measure(
            f"explain-{name}",
            "explain",
            sql_path=path,
            output=str(size.results / f"explain-{name}.txt"),
        )
    return out


def report_check(r: dict) -> None:
    check = r["check"]
    if check["ok"]:
        print(
            f"  correctness: OK ({check['audiences_compared']} audiences: product == baseline, counts and sets; "
            f"reference sample == product)"
        )
        return
    print("\n" + "!" * 100)
    print(f"!!! CORRECTNESS MISMATCH at {r['users']:,} users")
    for name in (
        "count_mismatches",
        "set_differences",
        "dagster_count_mismatches",
        "reference_mismatches",
    ):
        if check.get(name):
            print(f"!!! {name}: {json.dumps(check[name], indent=1)[:3000]}")
    print("!" * 100 + "\n")


# =============================================================================================
# Summaries and the report.


RUNS = {
    "cold_dagster": "**product, cold, Dagster job**",
    "cold_dbt": "full `dbt build` via run_dbt, cold",
    "warm_dagster": "**product, warm (1% changed), Dagster job**",
    "warm_dbt": "full `dbt build`, warm (1% changed)",
    "tick_dagster": "**product, schedule tick (nothing changed), Dagster job**",
    "tick_dbt": "full `dbt build`, tick (nothing changed)",
}


def summarize(r: dict) -> dict:
    baseline_s = r["baseline"]["seconds"]
    lean_s = r["baseline_lean"]["seconds"] if "baseline_lean" in r else None
    reference_s = r["reference"]["extrapolated_s"]
    s = {
        "users": r["users"],
        "baseline_s": baseline_s,
        "baseline_lean_s": lean_s,
        "reference_extrapolated_s": reference_s,
        "baseline_peak_mb": r["baseline"]["peak_rss_mb"],
        "dbt_startup_s": r["dbt_noop"]["seconds"],
    }
    for run in RUNS:
        m = r[run]
        evaluation = m["dbt"]["elapsed_s"]
        s[run] = {
            "wall_s": m["wall_s"],
            "evaluation_s": evaluation,
            "fixed_s": m["wall_s"] - evaluation,
            "sum_node_s": m["dbt"]["sum_node_s"],
            "peak_mb": m["peak_rss_mb"],
            "dbt_maxrss_mb": m["children_maxrss_mb"],
            "baseline_ratio": baseline_s / evaluation,
            "reference_ratio": reference_s / evaluation,
            "baseline_ratio_wall": baseline_s / m["wall_s"],
            "reference_ratio_wall": reference_s / m["wall_s"],
            "lean_ratio": lean_s / evaluation if lean_s else None,
        }
    s["preview_fresh_max_s"] = r["preview_fresh"]["max_first_s"]
    s["preview_inline_max_s"] = (
        r["preview_inline"]["max_first_s"] if "preview_inline" in r else None
    )
    s["correct"] = r["check"]["ok"]
    return s


def machine_info() -> dict:
    import dagster
    import dagster_dbt
    import duckdb

    memory = next(
        line
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    dbt_version = subprocess.run(
        [str(Path(sys.executable).parent / "dbt"), "--version"], capture_output=True, text=True
    ).stdout
    core = next(
        (line.split(":")[-1].strip() for line in dbt_version.splitlines() if "installed" in line),
        "?",
    )
    plugin = next(
        (
            line.split(":")[1].split("-")[0].strip()
            for line in dbt_version.splitlines()
            if "duckdb:" in line
        ),
        "?",
    )
    return {
        "nproc": os.cpu_count(),
        "memory": f"{int(memory.split()[1]) / 2**20:.1f} GiB",
        "cpu": cpu,
        "python": platform.python_version(),
        "duckdb": duckdb.__version__,
        "dbt_core": core,
        "dbt_duckdb": plugin,
        "dagster": dagster.__version__,
        "dagster_dbt": dagster_dbt.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
    }


def _mb(value: float) -> str:
    return f"{value:,.0f} MB"


def _phases(m: dict) -> str:
    p = m.get("phases") or {}
    if not p:
        return ""
    parts = (
        [
            f"dagster-dbt before dbt starts {p['dagster_before_dbt_s']:.1f} s (includes dbt's Python start-up)"
        ]
        if "dagster_before_dbt_s" in p
        else []
    )
    parts += [
        f"dbt adapter load {p.get('adapter_s', 0):.1f} s",
        f"{'full ' if p.get('full_parse') else ''}parse {p.get('parse_s', 0):.1f} s",
        f"execution {p.get('execute_s', 0):.1f} s",
        f"wrap-up {p.get('after_s', 0):.1f} s",
    ]
    if "dagster_after_dbt_s" in p:
        parts.append(f"dagster-dbt after dbt exits {p['dagster_after_dbt_s']:.1f} s")
    return ", ".join(parts)


def render_markdown(document: dict) -> str:
    m = document["machine"]
    lines = [
        "# Audience evaluation benchmark",
        "",
        f"Produced by `{document['command']}` (started {document.get('started', m['date'])}); "
        "every number is a single run on a shared, noisy machine (load average before each step is in results.json).",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory']} RAM, {m['platform']}. "
        f"Python {m['python']}, DuckDB {m['duckdb']}, dbt-core {m['dbt_core']} + dbt-duckdb {m['dbt_duckdb']}, "
        f"Dagster {m['dagster']} + dagster-dbt {m['dagster_dbt']}.",
        "",
        "The **Dagster job** rows are the product as its jobs run it (the `audience_models` asset decides what dbt "
        "builds); the *full `dbt build`* rows run every node of the project through `audiences.dbt.project.run_dbt`, "
        "as a reference point and to separate dbt from Dagster. "
        "How to read the tables (details in the docstring of `bench/run.py`): *evaluation* is dbt's `elapsed_time` "
        "from `run_results.json` (the build itself, all 69 nodes: models and data tests); *fixed cost* is wall minus "
        "evaluation (dbt start-up and parse; for the Dagster rows also loading the definitions and running the job); "
        "*peak memory* is the peak RSS of the whole process tree, dbt's DuckDB included. *Baseline*: one "
        "`insert ... select` per audience over raw.users, reading properties straight from JSON with the product's "
        "compiler inline (as `audiences/warehouse/queries.py` does without a flattened table). *Lean baseline*: the same "
        "queries, but each user's JSON is parsed once per query. *Reference*: the Python reference evaluator on a "
        "~20k-user sample, extrapolated. *Warm*: after touching 1% of users; *tick*: nothing changed, new evaluation time.",
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
            f"{gen['json_bytes'] / gen['users']:.0f} bytes of JSON per user, DuckDB file {gen['file_bytes'] / 2**30:.2f} GiB, "
            f"generated in {gen['seconds']:.0f} s. 50 audiences, {r['baseline']['total_members']:,} memberships "
            f"({r['baseline']['total_members'] / gen['active_users'] / 50:.1%} average selectivity). "
            f"Measured {r['started_at']} to {r['finished_at']}; product source fingerprint `{r.get('product_fingerprint')}`; "
            f"the evaluation time reaches dbt via {'raw.evaluation_clock (plain `dbt build`)' if r.get('invocation') == 'clock' else '`--vars`'}"
            f", as the Dagster asset does.",
            "",
            "| measurement | wall | evaluation | fixed cost | peak memory | baseline ÷ evaluation | reference ÷ evaluation |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for run, label in RUNS.items():
            x = s[run]
            lean = f"; lean {x['lean_ratio']:.1f}×" if x["lean_ratio"] else ""
            lines.append(
                f"| {label} | {x['wall_s']:.1f} s | {x['evaluation_s']:.1f} s | {x['fixed_s']:.1f} s | "
                f"{_mb(x['peak_mb'])} | **{x['baseline_ratio']:.1f}×**{lean} (wall {x['baseline_ratio_wall']:.1f}×) | "
                f"**{x['reference_ratio']:.0f}×** (wall {x['reference_ratio_wall']:.0f}×) |"
            )
        ref = r["reference"]
        lines += [
            f"| dbt start-up alone: `dbt build --select none_such` | {r['dbt_noop']['seconds']:.1f} s | | | "
            f"{_mb(r['dbt_noop']['peak_rss_mb'])} | | |",
            f"| dbt start-up alone with a new `--vars` (forces a full re-parse) | {r['dbt_noop_vars']['seconds']:.1f} s | | | "
            f"{_mb(r['dbt_noop_vars']['peak_rss_mb'])} | | |",
            f"| plain baseline (50 queries on JSON, compiler inline) | {r['baseline']['seconds']:.1f} s | | | "
            f"{_mb(r['baseline']['peak_rss_mb'])} | 1× | |",
        ]
        if "baseline_lean" in r:
            lines.append(
                f"| lean baseline (50 queries, JSON parsed once per query) | {r['baseline_lean']['seconds']:.1f} s | | | "
                f"{_mb(r['baseline_lean']['peak_rss_mb'])} | | |"
            )
        lines += [
            f"| reference evaluator, {ref['sample_users']:,}-user sample | {ref['evaluate_s']:.1f} s "
            f"({ref['per_user_ms']:.3f} ms/user) | | | {_mb(ref['peak_rss_mb'])} | | |",
            f"| reference evaluator, extrapolated to {ref['active_users']:,} users | {ref['extrapolated_s']:,.0f} s | | | | | 1× |",
            "",
        ]
        d = r["cold_dagster"]
        if r.get("product_changed_during_run"):
            lines += [
                f"**Note**: product files changed while this size was measured (other work in progress): "
                f"{', '.join('`' + n + '`' for n in r['product_changed_during_run'][:15])}.",
                "",
            ]
        lines += [
            f"The Dagster rows run the `reevaluate_audiences` job restricted to the evaluation: {d.get('selected_assets')} assets "
            f"(audience_definitions and the dbt assets) and their checks; not run: "
            + (", ".join(f"`{k}`" for k in d.get("not_selected", [])) or "nothing")
            + ".",
            "",
        ]
        lines += [
            "Where the fixed cost goes: "
            f"run_dbt cold: {_phases(r['cold_dbt'])} (from dbt.log; Python start-up of dbt is the rest). "
            f"Dagster cold: definitions load {d['load_s']:.1f} s, `execute_in_process` {d['execute_s']:.1f} s (steps: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(d["steps_s"].items()))
            + f"; inside it dbt: {_phases(d)}).",
            "",
        ]
        pf = r["preview_fresh"]
        pi = r.get("preview_inline")
        lines += [
            "`preview` (the whole call: count, 10-user sample, total), seconds:",
            "",
            "| audience | flattened table fresh (1st / 2nd call) | flattened table absent, inline JSON | members |",
            "|---|---:|---:|---:|",
        ]
        for audience, fresh in pf["audiences"].items():
            inline = f"{pi['audiences'][audience]['first_s']:.2f} s" if pi else "not measured"
            lines.append(
                f"| {audience} | {fresh['first_s']:.2f} / {fresh['second_s']:.2f} | {inline} | {fresh['count']:,} |"
            )
        lines.append("")
        check = r["check"]
        if check["ok"]:
            lines.append(
                f"Correctness: **OK**. Per-audience member counts and member sets of the product (run_dbt) equal the "
                f"baseline's for all {check['audiences_compared']} audiences; the Dagster run's counts equal them too; "
                f"the reference evaluator's members on the {ref['sample_users']:,}-user sample equal the product's"
                + (
                    "; the lean baseline's counts equal the baseline's."
                    if "baseline_lean" in r
                    and not r["baseline_lean"]["count_only_s"].get("mismatches_vs_inline")
                    else "."
                )
            )
        else:
            lines.append("Correctness: **MISMATCH** (a bug, see below).")
            for name in (
                "count_mismatches",
                "set_differences",
                "dagster_count_mismatches",
                "reference_mismatches",
            ):
                if check.get(name):
                    lines.append(f"- {name}: `{json.dumps(check[name])[:1500]}`")
        if "baseline_lean" in r and r["baseline_lean"]["count_only_s"].get("mismatches_vs_inline"):
            lines.append(
                f"- lean baseline vs baseline: `{json.dumps(r['baseline_lean']['count_only_s']['mismatches_vs_inline'])[:1000]}`"
            )
        lines.append("")
        lines += [
            "Slowest dbt nodes, seconds (2 dbt threads run nodes side by side):",
            "",
            "| node | cold, full build | warm, full build | tick, full build | warm, Dagster job | tick, Dagster job |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        other = {
            run: {n["unique_id"]: n["seconds"] for n in r[run]["dbt"]["nodes"]}
            for run in ("warm_dbt", "tick_dbt", "warm_dagster", "tick_dagster")
        }

        def cell(run, uid, other=other):
            return f"{other[run][uid]:.2f}" if uid in other[run] else "not run"

        for node in r["cold_dbt"]["dbt"]["nodes"][:10]:
            uid = node["unique_id"]
            lines.append(
                f"| `{uid}` | {node['seconds']:.2f} | {cell('warm_dbt', uid)} | {cell('tick_dbt', uid)} | "
                f"{cell('warm_dagster', uid)} | {cell('tick_dagster', uid)} |"
            )
        views = [
            n
            for n in r["cold_dbt"]["dbt"]["nodes"]
            if ".audiences." in n["unique_id"]
            and n["unique_id"].startswith("model.")
            and n["unique_id"].split(".")[-1]
            not in (
                "int_users_flattened",
                "audience_members",
                "audience_catalog",
                "audience_evaluations",
                "stg_warehouse__users",
            )
        ]
        tests = [n for n in r["cold_dbt"]["dbt"]["nodes"] if n["unique_id"].startswith("test.")]
        total_nodes = len(r["cold_dbt"]["dbt"]["nodes"])
        lines += [
            f"| {len(views)} audience views (sum) | {sum(n['seconds'] for n in views):.2f} | | | | |",
            f"| {len(tests)} data tests (sum) | {sum(n['seconds'] for n in tests):.2f} | "
            f"{sum(n['seconds'] for n in r['warm_dbt']['dbt']['nodes'] if n['unique_id'].startswith('test.')):.2f} | | | |",
            f"| all nodes (sum) | {r['cold_dbt']['dbt']['sum_node_s']:.2f} ({total_nodes}) | "
            f"{r['warm_dbt']['dbt']['sum_node_s']:.2f} | {r['tick_dbt']['dbt']['sum_node_s']:.2f} | "
            f"{r['warm_dagster']['dbt']['sum_node_s']:.2f} ({len(r['warm_dagster']['dbt']['nodes'])}) | "
            f"{r['tick_dagster']['dbt']['sum_node_s']:.2f} ({len(r['tick_dagster']['dbt']['nodes'])}) |",
            "",
        ]
        if r.get("profile"):
            lines += [
                "Profile (DuckDB JSON profiling) of the cold run's compiled SQL, each written to a scratch table in its "
                "own process; operator CPU is summed over both threads:",
                "",
            ]
            for name, x in r["profile"].items():
                top = "; ".join(
                    f"{o['operator']} {o['cpu_s']:.1f} s ({o['detail'][:70]})"
                    for o in x.get("top", [])[:4]
                )
                lines.append(
                    f"- `{name}`: wall {x['seconds']:.1f} s, operator CPU {x.get('operator_cpu_s', 0):.1f} s, "
                    f"checkpoint {x.get('checkpoint_s') or 0:.1f} s, peak RSS {_mb(x['peak_rss_mb'])}; top: {top}"
                )
            lines.append("")
        slow = sorted(r["baseline"]["per_audience"].items(), key=lambda item: -item[1]["seconds"])[
            :3
        ]
        lines += [
            "Baseline: slowest queries "
            + ", ".join(f"`{k}` {v['seconds']:.1f} s" for k, v in slow)
            + "; counting instead of writing: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in r["baseline"]["count_only_s"].items())
            + ".",
            "",
        ]
        for name, experiment in (r.get("experiments") or {}).items():
            lines.append(f"Experiment `{name}`: {experiment.get('summary', '')}")
        if r.get("experiments"):
            lines.append("")
    lines += targets_section(document)
    if ANALYSIS_MD.exists():
        lines += ["", ANALYSIS_MD.read_text().rstrip(), ""]
    return "\n".join(lines) + "\n"


def targets_section(document: dict) -> list[str]:
    lines = ["## Targets", "", "| target | users | measured | met? |", "|---|---|---|---|"]
    for key in sorted(document["sizes"], key=int):
        s = summarize(document["sizes"][key])
        n = f"{int(key):,}"
        for run in ("cold_dagster", "warm_dagster", "tick_dagster", "cold_dbt", "warm_dbt"):
            x = s[run]
            lean = f" (lean baseline: {x['lean_ratio']:.1f}×)" if x["lean_ratio"] else ""
            lines.append(
                f"| evaluation ≥ 10× faster than the baseline, {run} | {n} | {x['baseline_ratio']:.1f}×{lean} | "
                f"{'yes' if x['baseline_ratio'] >= TARGETS['baseline_ratio'] else '**no**'} |"
            )
            lines.append(
                f"| evaluation ≥ 200× faster than the reference, {run} | {n} | {x['reference_ratio']:.0f}× | "
                f"{'yes' if x['reference_ratio'] >= TARGETS['reference_ratio'] else '**no**'} |"
            )
        peak = max(s[run]["peak_mb"] for run in RUNS)
        lines.append(
            f"| peak memory < 2 GB (target at 10M) | {n} | {_mb(peak)} | "
            f"{'yes' if peak < TARGETS['peak_memory_mb_10m'] else '**no**'} |"
        )
        lines.append(
            f"| `preview` < 1 s (target at 1M), flattened table fresh | {n} | {s['preview_fresh_max_s']:.2f} s (slowest of 5) | "
            f"{'yes' if s['preview_fresh_max_s'] < TARGETS['preview_s_1m'] else '**no**'} |"
        )
        if s["preview_inline_max_s"] is not None:
            lines.append(
                f"| (information) `preview` with the flattened table absent | {n} | {s['preview_inline_max_s']:.2f} s | |"
            )
    return lines


def write_report(sizes: dict[int, dict], command: str, started: str) -> None:
    document = {"command": command, "started": started, "machine": machine_info(), "sizes": {}}
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
    parser.add_argument(
        "--quick", action="store_true", help="100k users, a smoke test; results stay in bench/data/"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite results.md from results.json"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="after an interruption: reuse complete sizes and the steps measured before it",
    )
    options = parser.parse_args()
    command = ".venv/bin/python bench/run.py " + " ".join(sys.argv[1:])
    if options.report_only:
        document = json.loads(RESULTS_JSON.read_text())
        RESULTS_MD.write_text(render_markdown(document))
        return
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "workflows").mkdir(exist_ok=True)
    (DATA / "sinks.yml").write_text(
        "default: file\nsinks:\n  file:\n    type: file\n    path: out/workflow_triggers.jsonl\n"
    )
    synthetic.write_definitions(DEFINITIONS)
    SOURCES_FILE.write_text(
        "# The benchmark loads users straight into raw.users: no sources.\nsources: []\n"
    )
    sizes = [100_000] if options.quick else options.users
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results = {}
    for users in sizes:
        results[users] = run_size(users, options)
        s = summarize(results[users])
        print(
            f"  cold: evaluation {s['cold_dbt']['evaluation_s']:.1f} s, baseline {s['baseline_s']:.1f} s "
            f"({s['cold_dbt']['baseline_ratio']:.1f}×), reference extrapolated {s['reference_extrapolated_s']:.0f} s "
            f"({s['cold_dbt']['reference_ratio']:.0f}×), peak {s['cold_dbt']['peak_mb']:.0f} MB"
        )
    if options.quick:
        quick = DATA / "quick-results.md"
        document = {
            "command": command,
            "started": started,
            "machine": machine_info(),
            "sizes": {str(k): v for k, v in results.items()},
        }
        (DATA / "quick-results.json").write_text(json.dumps(document, indent=1, default=str))
        quick.write_text(render_markdown(document))
        print(f"\nwrote {quick}")
    else:
        write_report(results, command, started)


if __name__ == "__main__":
    main()
