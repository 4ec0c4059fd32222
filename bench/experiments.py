"""Profiling experiments that follow bench/run.py: where the product's time goes, and what a change would save.

    .venv/bin/python bench/experiments.py --users 10000000 members     # audience_members: full vs incremental
    .venv/bin/python bench/experiments.py --users 1000000 flattened    # int_users_flattened: generated vs rewritten
    .venv/bin/python bench/experiments.py --users 1000000 dagster      # cProfile of a warm Dagster evaluation

Run after bench/run.py has measured that size (it reuses its warehouse and dbt project copy under
bench/data/<size>/; nothing in the repo is touched). Each measurement runs in a child process, like
run.py's, and reports wall time, CPU time and peak RSS. Results go to bench/data/<size>/experiments.json;
run.py's report includes them.

members   The warm evaluation rebuilds `audience_members` (78M rows at 10M users) from scratch every run.
          Only audiences whose conditions read the evaluation time (relative times, `*_now`, or membership
          of such an audience) can change for users whose data did not change. This measures (A) the
          full rebuild as dbt compiles it, (B) rebuilding only the time-dependent audiences, and (C) an
          incremental update of the other audiences for the 1% of users touched by run.py's rounds.
          B + C is what an incremental audience_members would cost.
flattened The cold extraction evaluates, for every property and variant, `json_type(...)` and `->> '$'`
          on JSON fragments many times. The rewrite reads each user's JSON twice, once with
          `json_type(properties, [paths])` and once with `json_extract_string(properties, [paths])`,
          and derives every variant from those two lists; its output is compared column by column.
dagster   cProfile of one warm `reevaluate_audiences` evaluation (as run.py runs it), to see what the
          fixed cost outside dbt is made of.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run  # noqa: E402


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(connection, sql: str) -> dict:
    start, cpu = time.perf_counter(), _cpu()
    connection.execute(sql)
    return {"wall_s": time.perf_counter() - start, "cpu_s": _cpu() - cpu}


# ---------------------------------------------------------------------------------------------
# Child steps.


def time_dependent_audiences(definitions_dir: Path, project: Path) -> set[str]:
    """Audiences whose generated model reads the evaluation time, or that refer to one that does."""
    from audiences.conditions.definitions import load_definitions

    definitions = load_definitions(definitions_dir)
    direct = {
        key
        for key, d in definitions.items()
        if "evaluation_time()"
        in (project / "models" / "audiences" / "dynamic" / f"{d.model_name}.sql").read_text()
    }
    dependent, changed = set(direct), True
    while changed:
        changed = False
        for key, d in definitions.items():
            if key not in dependent and d.references() & dependent:
                dependent.add(key)
                changed = True
    return dependent


def _members_parts(sql_path: Path) -> dict[str, str]:
    """The compiled audience_members query split into its per-audience selects."""
    body = sql_path.read_text()
    parts = [p.strip() for p in re.split(r"\n\s*union all\s*\n", body) if "as audience_key" in p]
    keyed = {}
    for part in parts:
        part = part[part.index("select") :]
        keyed[re.search(r"select '([^']+)' as audience_key", part).group(1)] = part
    return keyed


def step_members(params):
    connection = run._connect(params)
    connection.execute("create schema if not exists bench")
    parts = _members_parts(Path(params["members_sql"]))
    dependent = time_dependent_audiences(Path(params["definitions"]), Path(params["project"]))
    others = sorted(set(parts) - dependent)
    out = {"audiences": len(parts), "time_dependent": sorted(dependent)}
    union = lambda keys: "\nunion all\n".join(parts[k] for k in keys)  # noqa: E731
    out["A_full_rebuild"] = _timed(
        connection, f"create or replace table bench.members_a as {union(sorted(parts))}"
    )
    out["A_rows"] = connection.execute("select count(*) from bench.members_a").fetchone()[0]
    out["B_time_dependent_rebuild"] = _timed(
        connection, f"create or replace table bench.members_b as {union(sorted(dependent))}"
    )
    out["B_rows"] = connection.execute("select count(*) from bench.members_b").fetchone()[0]
    # C: the other audiences, for the users changed since the last evaluation (1%: user_key % 100 = 7).
    connection.execute(
        "create or replace table bench.members_c as select * from bench.members_a "
        f"where audience_key in ({', '.join(repr(k) for k in others)})"
    )
    connection.execute(
        "create or replace temp table changed as select user_key from raw.users where user_key % 100 = 7"
    )
    delete = _timed(
        connection, "delete from bench.members_c where user_key in (select user_key from changed)"
    )
    changed_union = "\nunion all\n".join(
        f"select * from ({parts[k]}) where user_key in (select user_key from changed)"
        for k in others
    )
    insert = _timed(connection, f"insert into bench.members_c {changed_union}")
    out["C_incremental_others"] = {
        "wall_s": delete["wall_s"] + insert["wall_s"],
        "cpu_s": delete["cpu_s"] + insert["cpu_s"],
        "delete_s": delete["wall_s"],
        "insert_s": insert["wall_s"],
    }
    out["B_plus_C_wall_s"] = (
        out["B_time_dependent_rebuild"]["wall_s"] + out["C_incremental_others"]["wall_s"]
    )
    for table in ("members_a", "members_b", "members_c"):
        connection.execute(f"drop table bench.{table}")
    connection.close()
    return out


def step_flattened(params):
    """Generated vs rewritten extraction, each written to a scratch table; output compared column by column."""
    connection = run._connect(params)
    connection.execute("create schema if not exists bench")
    original = Path(params["flattened_sql"]).read_text()
    rewritten = rewritten_flattened_sql(
        Path(params["definitions"]), '"warehouse"."main"."stg_warehouse__users"'
    )
    Path(params["result_path"]).with_name("flattened-rewritten.sql").write_text(rewritten)
    out = {"runs": []}
    for attempt in range(params.get("repeat", 2)):
        for name, sql in (("generated", original), ("rewritten", rewritten)):
            timing = _timed(connection, f"create or replace table bench.flat_{name} as {sql}")
            out["runs"].append({"model": name, "attempt": attempt, **timing})
    columns = [
        row[0]
        for row in connection.execute(
            "select column_name from information_schema.columns where table_schema = 'bench' and table_name = 'flat_generated'"
        ).fetchall()
        if row[0] not in ("attribute_spec",)
    ]
    differences = {}
    for column in columns:
        count = connection.execute(
            f"select count(*) from bench.flat_generated as a full join bench.flat_rewritten as b using (user_key) "
            f'where a."{column}" is distinct from b."{column}"'
        ).fetchone()[0]
        if count:
            differences[column] = count
    out["differences"] = differences
    for name in ("generated", "rewritten"):
        runs = [r for r in out["runs"] if r["model"] == name]
        out[f"{name}_best_wall_s"] = min(r["wall_s"] for r in runs)
        out[f"{name}_best_cpu_s"] = min(r["cpu_s"] for r in runs)
        connection.execute(f"drop table bench.flat_{name}")
    connection.close()
    return out


def rewritten_flattened_sql(definitions_dir: Path, source: str) -> str:
    """int_users_flattened's select, each user's JSON read twice (types and texts of every path)."""
    from audiences.conditions.arguments import EPOCH_RANGE, NUMBER_PATTERN, TIMESTAMP_PATTERN
    from audiences.conditions.compiler import (
        NUMERIC_JSON_TYPES,
        VARIANTS,
        attributes_used,
        json_pointer,
    )
    from audiences.conditions.definitions import load_definitions

    definitions = load_definitions(definitions_dir)
    attributes = sorted(
        set().union(
            *(attributes_used(d.segments) for d in definitions.values() if d.type == "dynamic")
        ),
        key=lambda a: (a.path, VARIANTS.index(a.variant)),
    )

    def quote(text):
        return "'" + text.replace("'", "''") + "'"

    numeric = "(" + ", ".join(quote(t) for t in NUMERIC_JSON_TYPES) + ")"
    paths = sorted({a.path for a in attributes if a.path != ("id",)})
    position = {path: index + 1 for index, path in enumerate(paths)}
    pointers = "[" + ", ".join(quote(json_pointer(p)) for p in paths) + "]"
    numbers = {a.path for a in attributes if a.variant in ("number", "timestamp")}
    typed = []
    for i in position.values():
        typed += [f"types[{i}] as t{i}", f"texts[{i}] as s{i}"]
    with_numbers = []
    for path, i in position.items():
        with_numbers += [f"t{i}", f"s{i}"]
        if path in numbers:
            with_numbers.append(
                f"case when t{i} in {numeric} then cast(s{i} as double) when t{i} = 'VARCHAR' and "
                f"regexp_full_match(s{i}, {quote(NUMBER_PATTERN)}) then cast(s{i} as double) end as n{i}"
            )
    columns = []
    for a in attributes:
        if a.path == ("id",):
            raise ValueError("recipient.id attributes are not handled by this prototype")
        i = position[a.path]
        t, s = f"t{i}", f"s{i}"
        expression = {
            "kind": f"case when {t} = 'VARCHAR' then 'string' when {t} in {numeric} then 'number' when {t} = 'BOOLEAN' "
            f"then 'boolean' when {t} = 'ARRAY' then 'list' when {t} = 'OBJECT' then 'object' end",
            "text": f"case when {t} = 'VARCHAR' then {s} end",
            "number": f"n{i}",
            "boolean": f"case when {t} = 'BOOLEAN' then {s} = 'true' end",
            "json": f"case when {t} = 'VARCHAR' then to_json({s}) when {t} is not null and {t} <> 'NULL' then {s}::json end",
            "items": f"case when {t} = 'ARRAY' then list_transform(json_extract({s}, '$[*]'), lambda item: case "
            f"when json_type(item) = 'VARCHAR' then 's:' || (item ->> '$') "
            f"when json_type(item) = 'BOOLEAN' then 'b:' || cast(item as varchar) "
            f"when json_type(item) = 'NULL' then 'null' "
            f"when json_type(item) in {numeric} then 'n:' || cast(cast(item as double) + 0.0 as varchar) "
            f"else 'j:' || cast(item as varchar) end) end",
            "timestamp": f"case when {t} = 'VARCHAR' and regexp_full_match({s}, {quote(TIMESTAMP_PATTERN)}) then "
            f"try_cast({s} as timestamptz) when n{i} between {EPOCH_RANGE[0]} and {EPOCH_RANGE[1]} "
            f"then to_timestamp(n{i}) end",
        }[a.variant]
        columns.append(f'{expression} as "{a.column_name}"')
    keys = "user_key, user_id, updated_at, is_deleted"
    return (
        f"with extracted as (select {keys}, json_type(properties, {pointers}) as types, "
        f"json_extract_string(properties, {pointers}) as texts from {source}),\n"
        f"typed as (select {keys}, {', '.join(typed)} from extracted),\n"
        f"numbered as (select {keys}, {', '.join(with_numbers)} from typed)\n"
        f"select {keys}, 'rewritten' as attribute_spec,\n    "
        + ",\n    ".join(columns)
        + "\nfrom numbered"
    )


def step_dagster_profile(params):
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    result = run.step_product_dagster(params)
    profiler.disable()
    stats_path = Path(params["result_path"]).with_name("dagster-profile.txt")
    with open(stats_path, "w") as handle:
        stats = pstats.Stats(profiler, stream=handle)
        stats.sort_stats("cumulative").print_stats(45)
    return {
        "wall_s": result["wall_s"],
        "load_s": result["load_s"],
        "execute_s": result["execute_s"],
        "phases": result["phases"],
        "evaluation_s": result["dbt"]["elapsed_s"],
        "profile": str(stats_path),
    }


STEPS = {
    "members": step_members,
    "flattened": step_flattened,
    "dagster_profile": step_dagster_profile,
}


# ---------------------------------------------------------------------------------------------
# Parent.


def measure(size: run.Size, label: str, step: str, **extra) -> dict:
    result_path = size.results / f"experiment-{label}.json"
    params = size.params(result_path=str(result_path), **extra)
    log_path = size.logs / f"experiment-{label}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", step, json.dumps(params)],
            cwd=run.ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                **run.bench_environment(size),
                "DBT_LOG_PATH": str(size.logs / f"dbt-experiment-{label}"),
            },
        )
        sampler = run.TreeSampler(process.pid)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    sampler.stop()
    if process.returncode != 0:
        raise RuntimeError(
            f"experiment {label} failed; see {log_path}:\n{log_path.read_text()[-3000:]}"
        )
    result = json.loads(result_path.read_text())
    result.update(
        process_wall_s=wall,
        peak_rss_mb=max(
            usage.ru_maxrss / 1024, result.get("children_maxrss_mb", 0), sampler.peak / 2**20
        ),
        load_average_before=os.getloadavg()[0],
    )
    print(
        f"  [{size.users:>10,}] experiment {label}: {wall:.1f} s, peak {result['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return result


def summary(name: str, x: dict) -> str:
    if name == "members":
        a, b, c = x["A_full_rebuild"], x["B_time_dependent_rebuild"], x["C_incremental_others"]
        return (
            f"audience_members rebuilt in full ({x['A_rows']:,} rows) {a['wall_s']:.1f} s wall / {a['cpu_s']:.1f} s CPU; "
            f"only the {len(x['time_dependent'])} time-dependent audiences ({x['B_rows']:,} rows) {b['wall_s']:.1f} s / "
            f"{b['cpu_s']:.1f} s CPU; the other {x['audiences'] - len(x['time_dependent'])} audiences updated for the 1% "
            f"changed users {c['wall_s']:.1f} s; incremental total {x['B_plus_C_wall_s']:.1f} s "
            f"({x['B_plus_C_wall_s'] / a['wall_s']:.0%} of the full rebuild); peak {x['peak_rss_mb']:,.0f} MB."
        )
    if name == "flattened":
        return (
            f"int_users_flattened, cold, best of {len(x['runs']) // 2}: generated {x['generated_best_wall_s']:.1f} s wall / "
            f"{x['generated_best_cpu_s']:.1f} s CPU; rewritten (two JSON reads per user, variants from them) "
            f"{x['rewritten_best_wall_s']:.1f} s / {x['rewritten_best_cpu_s']:.1f} s CPU; "
            f"columns that differ: {x['differences'] or 'none'}."
        )
    if name == "dagster":
        p = x["phases"]
        return (
            f"warm Dagster evaluation under cProfile: {x['wall_s']:.1f} s (definitions load {x['load_s']:.1f} s, "
            f"dagster-dbt before dbt starts {p.get('dagster_before_dbt_s', 0):.1f} s, dbt {p.get('total_s', 0):.1f} s "
            f"of which evaluation {x['evaluation_s']:.1f} s, after dbt {p.get('dagster_after_dbt_s', 0):.1f} s); "
            f"top functions in {Path(x['profile']).relative_to(run.ROOT)}."
        )
    return ""


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        params = json.loads(sys.argv[3])
        result = STEPS[sys.argv[2]](params)
        result["children_maxrss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        Path(params["result_path"]).write_text(json.dumps(result, indent=1, default=str))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("experiments", nargs="+", choices=["members", "flattened", "dagster"])
    options = parser.parse_args()
    size = run.Size(options.users)
    store = size.folder / "experiments.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    steps = size.results
    for name in options.experiments:
        if name == "members":
            x = measure(
                size, "members", "members", members_sql=str(steps / "cold-dbt-audience_members.sql")
            )
        elif name == "flattened":
            x = measure(
                size,
                "flattened",
                "flattened",
                flattened_sql=str(steps / "cold-dbt-int_users_flattened.sql"),
                repeat=2,
            )
        else:
            connection_params = size.params(
                result_path=str(steps / "experiment-touch.json"), round=9
            )
            run.step_touch(connection_params)
            x = measure(size, "dagster", "dagster_profile", evaluation_time=run.later(135))
        x["summary"] = summary(name, x)
        results[name] = x
        print("   ", x["summary"])
        store.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
