"""int_users_flattened when the set of properties that definitions read changes: a new property
adds its own columns in place, rewriting no row and keeping every other column as it is; a
property no definition reads any more loses its columns. Real dbt builds on a copy of the sample
run's warehouse."""

from __future__ import annotations

import json
import shutil

import duckdb
from condition_harness import ROOT

from audiences.conditions.compiler import Attribute
from audiences.dbt.models import flattened_columns

NEW_AUDIENCE = {
    "name": "Large companies",
    "type": "dynamic",
    "description": "Reads a property no other definition reads.",
    "segments": [
        {"conditions": [{"property": "recipient.company.name", "operator": "exists"}]},
        {
            "conditions": [
                {"property": "recipient.company.name", "operator": "contains", "argument": "Ltd"}
            ]
        },
    ],
}
# Marks one existing column of one user: it survives only if the build does not extract it again.
MARK = "kept, not extracted again"


def _project(sample_run, tmp_path):
    from audiences.settings import Settings

    warehouse = tmp_path / "warehouse.duckdb"
    shutil.copy(sample_run, warehouse)
    project = tmp_path / "dbt_project"
    shutil.copytree(
        ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs", "*.duckdb")
    )
    definitions = tmp_path / "audiences"
    shutil.copytree(ROOT / "data" / "audiences", definitions)
    settings = Settings.from_env(
        {}, duckdb_path=warehouse, dbt_project_dir=project, definitions_dir=definitions
    )
    return settings, warehouse, definitions


def _row_ids(connection) -> dict[int, int]:
    """Each user's row id: a row deleted and inserted again gets a new one."""
    return dict(
        connection.execute("select user_key, rowid from main.int_users_flattened").fetchall()
    )


def _columns(connection) -> list[str]:
    return [
        row[0]
        for row in connection.execute(
            "select column_name from information_schema.columns "
            "where table_name = 'int_users_flattened' order by ordinal_position"
        ).fetchall()
    ]


def test_a_new_property_adds_its_columns_and_keeps_the_others(sample_run, tmp_path):
    from audiences.dbt.project import generate, prepare, run_dbt

    settings, warehouse, definitions = _project(sample_run, tmp_path)
    with duckdb.connect(str(warehouse)) as connection:
        before = _columns(connection)
        rows_before = connection.execute(
            "select count(*) from main.int_users_flattened"
        ).fetchone()[0]
        connection.execute(
            "update main.int_users_flattened set \"plan__text\" = $mark where user_id = 'user_00001'",
            {"mark": MARK},
        )
        row_ids = _row_ids(connection)
    assert "company__name__kind" not in before

    (definitions / "large-companies").mkdir()
    (definitions / "large-companies" / "audience.json").write_text(json.dumps(NEW_AUDIENCE))
    generate(settings)
    prepare(settings)
    run_dbt(
        ["build", "--select", "int_users_flattened", "large_companies", "audience_members"],
        settings,
    )

    new = [Attribute(("company", "name"), variant) for variant in ("kind", "text", "items")]
    extraction, expected = flattened_columns(new)
    with duckdb.connect(str(warehouse)) as connection:
        after = _columns(connection)
        assert set(after) == set(before) | {attribute.column_name for attribute in new}
        # No row was rewritten: the columns were added in place (a rewrite gives new row ids).
        assert _row_ids(connection) == row_ids
        # The user's other columns were kept: the mark is still there.
        assert (
            connection.execute(
                "select plan__text from main.int_users_flattened where user_id = 'user_00001'"
            ).fetchone()[0]
            == MARK
        )
        # Every user's new columns hold what a full extraction gives.
        selected = ", ".join(f"{sql} as {name}" for _, sql, name in expected)
        differences = connection.execute(
            f"""
            with expected as (
                select user_key, {selected}
                from (select user_key, user_id, {extraction} as property_values
                      from raw.users where deleted_at is null)
            )
            select count(*) from expected
            full join main.int_users_flattened as built using (user_key)
            where {" or ".join(f"expected.{name} is distinct from built.{name}" for _, _, name in expected)}
            """
        ).fetchone()[0]
        assert differences == 0
        assert (
            connection.execute("select count(*) from main.int_users_flattened").fetchone()[0]
            == rows_before
        )
        assert (
            connection.execute(
                "select count(*) from main.int_users_flattened where company__name__kind = 'string'"
            ).fetchone()[0]
            > 0
        )
        # audience_members evaluates the new audience whole, and the sample's other dynamic
        # audiences still per user: the columns they read kept their values (static and custom
        # SQL audiences are always evaluated whole). Nobody's data changed: no user is listed.
        whole = connection.execute(
            "select audience_key from main.audience_members__reevaluated where user_key is null"
        ).fetchall()
        # (Per-tenant audiences too: they are re-evaluated by pairs, and no pair changed.)
        documents = {
            folder.name: json.loads((folder / "audience.json").read_text())
            for folder in (ROOT / "data" / "audiences").iterdir()
        }
        dynamic = {key for key, document in documents.items() if document["type"] == "dynamic"}
        assert "large-companies" in {key for (key,) in whole}
        assert not dynamic & {key for (key,) in whole}
        assert (
            connection.execute(
                "select count(*) from main.audience_members__reevaluated where user_key is not null"
            ).fetchone()[0]
            == 0
        )

    # No definition reads the property any more: its columns go, the others stay as they were.
    shutil.rmtree(definitions / "large-companies")
    generate(settings)
    prepare(settings)
    run_dbt(["build", "--select", "int_users_flattened"], settings)
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        assert set(_columns(connection)) == set(before)
        assert (
            connection.execute(
                "select plan__text from main.int_users_flattened where user_id = 'user_00001'"
            ).fetchone()[0]
            == MARK
        )


def test_a_new_property_and_changed_users_in_one_build_equal_a_full_build(sample_run, tmp_path):
    """A user who changed in the same build as a new property: the new columns added in place and
    the changed user's row extracted again give exactly the table (values and column types) that a
    full build of the same definitions gives."""
    from audiences.dbt.project import generate, prepare, run_dbt
    from audiences.settings import Settings

    settings, warehouse, definitions = _project(sample_run, tmp_path)
    with duckdb.connect(str(warehouse)) as connection:
        connection.execute(
            """
            update raw.users
            set properties = json_merge_patch(
                    properties, '{"company": {"name": "Zeta Ltd"}, "plan": "changed"}'
                ),
                updated_at = (select max(updated_at) from raw.users) + interval 1 hour
            where user_id = 'user_00002'
            """
        )
    (definitions / "large-companies").mkdir()
    (definitions / "large-companies" / "audience.json").write_text(json.dumps(NEW_AUDIENCE))
    generate(settings)
    prepare(settings)
    run_dbt(["build", "--select", "int_users_flattened"], settings)

    full = tmp_path / "full.duckdb"
    shutil.copy(warehouse, full)
    run_dbt(
        ["build", "--select", "int_users_flattened", "--full-refresh"],
        Settings.from_env(
            {},
            duckdb_path=full,
            dbt_project_dir=settings.dbt_project_dir,
            definitions_dir=definitions,
        ),
    )
    with duckdb.connect(str(warehouse)) as connection:
        connection.execute(f"attach '{full}' as full_build (read_only)")
        types = {
            name: sorted(
                connection.execute(
                    "select column_name, data_type from information_schema.columns "
                    "where table_catalog = $catalog and table_name = 'int_users_flattened'",
                    {"catalog": catalog},
                ).fetchall()
            )
            for name, catalog in (("added", warehouse.stem), ("full", "full_build"))
        }
        assert types["added"] == types["full"]
        names = [name for name, _ in types["full"]]
        differences = connection.execute(
            f"""
            select count(*)
            from main.int_users_flattened as added
            full join full_build.main.int_users_flattened as rebuilt using (user_key)
            where {" or ".join(f'added."{n}" is distinct from rebuilt."{n}"' for n in names)}
            """
        ).fetchone()[0]
        assert differences == 0
        assert connection.execute(
            "select company__name__text, plan__text from main.int_users_flattened "
            "where user_id = 'user_00002'"
        ).fetchone() == ("Zeta Ltd", "changed")
