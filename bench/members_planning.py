"""DuckDB's planning time of `audience_members` statements, by how many audiences one holds.

    .venv/bin/python bench/members_planning.py --audiences 2000 --sizes 25 50 100 200 500 2000

Issue 25 found that one statement over every audience spends its time in DuckDB's optimizer
(growing with the square of the audiences), not in execution. This measures the planning alone:
the audiences of `bench/audience_count.py` (the 50 synthetic ones repeated), their per-user SQL
as `audiences generate` writes it (every audience re-evaluated per user), split into statements of
at most `size` audiences, each statement planned by `EXPLAIN` over empty tables of the real
columns. It prints the seconds to plan every audience once, for each size; the batch size of
`audiences/dbt/models.py` (`MEMBERS_BATCH_SIZE`) was chosen from it (bench/analysis.md).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import jinja2

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import audience_count  # noqa: E402

from audiences.conditions.compiler import VARIANTS, attributes_used  # noqa: E402
from audiences.conditions.definitions import load_definitions  # noqa: E402
from audiences.dbt import models  # noqa: E402


def branches(definitions_dir: Path) -> tuple[list[str], list]:
    """Every audience's per-user SELECT (Jinja rendered: every audience per user), and attributes."""
    definitions = load_definitions(definitions_dir)
    dynamic = [d for d in definitions.values() if d.type == "dynamic"]
    attributes = sorted(
        set().union(*(attributes_used(d.segments) for d in dynamic)),
        key=lambda a: (a.path, VARIANTS.index(a.variant)),
    )
    placeholders = models._Placeholders.for_definitions(definitions.values())
    found, _, _ = models._members_branches(definitions, [], placeholders)
    environment = jinja2.Environment()
    rendered = [
        environment.from_string(branch).render(
            per_user=list(definitions),
            ref=lambda name: f"audiences.{name}",
            evaluation_time=lambda: "timestamptz '2026-11-01 12:00:00+00'",
        )
        for branch in found
    ]
    return rendered, attributes


def tables(connection, attributes, model_names) -> None:
    extraction, columns = models.flattened_columns(attributes)
    connection.execute(
        "create table users (user_key integer, user_id varchar, updated_at timestamptz, "
        "is_deleted boolean, properties json)"
    )
    selected = ", ".join(["user_key", "user_id"] + [f"{sql} as {name}" for _, sql, name in columns])
    for name in ("users_to_reevaluate", "users_to_reevaluate_in_time", "flattened"):
        connection.execute(
            f"create table {name} as select {selected} "
            f"from (select user_key, user_id, {extraction} as property_values from users)"
        )
    connection.execute("create schema audiences")
    for name in model_names:
        connection.execute(
            f'create table audiences."{name}" (user_key integer, user_id varchar, tenant varchar)'
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audiences", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200, 500, 2000])
    parser.add_argument(
        "--cte",
        action="store_true",
        help="the shape before issue 25: the users as materialized CTEs of each statement",
    )
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        definitions_dir = Path(folder) / "audiences"
        audience_count.write_definitions(definitions_dir, options.audiences)
        rendered, attributes = branches(definitions_dir)
        names = sorted({m for text in rendered for m in re.findall(r"audiences\.(\w+)", text)})
        connection = duckdb.connect()
        tables(connection, attributes, names)
        shape = "materialized CTEs (before)" if options.cte else "temporary tables"
        print(
            f"{options.audiences} audiences, per-user SQL over {shape}; seconds to plan them all:"
        )
        for size in options.sizes:
            statements = [
                "\nunion all\n".join(rendered[start : start + size])
                for start in range(0, len(rendered), size)
            ]
            if options.cte:
                statements = [
                    "with users_to_reevaluate as materialized (select * from flattened), "
                    "users_to_reevaluate_in_time as materialized "
                    "(select * from users_to_reevaluate)\n" + statement
                    for statement in statements
                ]
            start = time.perf_counter()
            for statement in statements:
                connection.execute("explain " + statement).fetchall()
            seconds = time.perf_counter() - start
            print(
                f"  {size:>5} audiences per statement: {len(statements):>4} statements, "
                f"{seconds:7.2f} s ({1000 * seconds / len(rendered):.1f} ms per audience)",
                flush=True,
            )


if __name__ == "__main__":
    main()
