"""Ways to parse each user's JSON once, against the floor of one parse: the measurement behind the
choice of `json_extract(properties, [paths])` in int_users_flattened (bench/analysis.md).

    .venv/bin/python bench/extraction.py WAREHOUSE.duckdb --users 200000

WAREHOUSE is a DuckDB file with `raw.users` (bench/synthetic.py's users, as bench/run.py or
bench/new_property.py generate them). The benchmark's 50 audiences read 36 properties in 76 typed
columns. Each way reads the first `--users` live users, twice; reported is the process's CPU time
(user + system) of the faster run, which a shared machine disturbs less than wall time, and
the wall time beside it. Nothing is written but a temporary table.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import synthetic  # noqa: E402


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    import duckdb

    from audiences.conditions.compiler import VARIANTS, attributes_used, json_pointer
    from audiences.conditions.definitions import load_definitions
    from audiences.dbt.models import flattened_columns

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("warehouse")
    parser.add_argument("--users", type=int, default=200_000)
    arguments = parser.parse_args()

    folder = Path(tempfile.mkdtemp())
    synthetic.write_definitions(folder)
    definitions = load_definitions(folder)
    attributes = sorted(
        set().union(
            *(attributes_used(d.segments) for d in definitions.values() if d.type == "dynamic")
        ),
        key=lambda a: (a.path, VARIANTS.index(a.variant)),
    )
    extraction, columns = flattened_columns(attributes)
    paths = sorted({a.path for a in attributes if a.path != ("id",)})
    pointers = "[" + ", ".join("'" + json_pointer(path) + "'" for path in paths) + "]"
    tree: dict = {}
    for path in paths:
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node.setdefault(path[-1], "JSON")
    structure = json.dumps(tree).replace("'", "''")
    derived = ", ".join(f"{sql} as {name}" for _, sql, name in columns)

    connection = duckdb.connect(arguments.warehouse, read_only=True)
    connection.execute(
        "create temp table sample as select * from raw.users where deleted_at is null "
        f"limit {int(arguments.users)}"
    )
    ways = {
        "read the JSON text only": "select sum(len(properties::varchar)) from sample",
        "floor: one parse (json_valid)": "select count(*) filter (where json_valid(properties)) from sample",
        f"json_extract of the {len(paths)} paths (the product's)": f"select sum(len(json_extract(properties, {pointers}))) from sample",
        "json_type of the paths": f"select sum(len(json_type(properties, {pointers}))) from sample",
        "json_extract_string of the paths": f"select sum(len(json_extract_string(properties, {pointers}))) from sample",
        "json_transform into a struct of JSON leaves": f"select count(*) filter (where x is not null) from (select json_transform(properties, '{structure}') as x from sample)",
        "properties::variant (DuckDB 2.0 VARIANT)": "select count(*) filter (where properties::variant is not null) from sample",
        f"the product's extraction: {len(columns)} typed columns into a table": f"create or replace temp table flattened as select user_key, {derived} from (select user_key, user_id, {extraction} as property_values from sample)",
    }
    print(f"{arguments.users:,} users, {len(paths)} properties, {len(columns)} columns")
    print("| way | CPU s | wall s |\n|---|---:|---:|")
    for name, sql in ways.items():
        runs = []
        for _ in range(2):
            start, cpu = time.perf_counter(), _cpu()
            connection.execute(sql).fetchall()
            runs.append((_cpu() - cpu, time.perf_counter() - start))
        cpu, wall = min(runs)
        print(f"| {name} | {cpu:.2f} | {wall:.2f} |", flush=True)


if __name__ == "__main__":
    main()
