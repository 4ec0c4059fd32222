"""The tables that dbt hooks make (not models) are declared in yml, so `dbt docs` lists them."""

from __future__ import annotations

import json

import duckdb


def test_every_table_the_hooks_make_is_declared_with_its_columns(sample_run, dbt_project_copy):
    """Issue 14 item 8: after a real run, every table in the schemas the dbt project writes is a
    model or a source in the manifest, and each source there describes itself and each of its
    columns, which are exactly the table's."""
    manifest = json.loads((dbt_project_copy / "target" / "manifest.json").read_text())
    models = {
        (node["schema"], node["alias"] or node["name"])
        for node in manifest["nodes"].values()
        if node["resource_type"] in ("model", "seed", "snapshot")
    }
    sources = {(s["schema"], s["identifier"]): s for s in manifest["sources"].values()}
    schemas = {schema for schema, _ in models}
    with duckdb.connect(str(sample_run), read_only=True) as connection:
        tables = connection.execute(
            "select table_schema, table_name, list(column_name order by ordinal_position) "
            "from information_schema.columns where table_catalog = current_database() "
            "group by all order by all"
        ).fetchall()
    hook_made = [(schema, name, columns) for schema, name, columns in tables if schema in schemas]
    hook_made = [(s, n, c) for s, n, c in hook_made if (s, n) not in models]
    assert {name for _, name, _ in hook_made} >= {
        "audience_members__state",
        "audience_members__reevaluated",
        "int_users_flattened__covered",
    }
    for schema, name, columns in hook_made:
        source = sources.get((schema, name))
        assert source is not None, f"{schema}.{name} is made by a hook and declared nowhere"
        assert source["description"].strip(), name
        assert list(source["columns"]) == columns, name
        assert all(column["description"].strip() for column in source["columns"].values()), name
