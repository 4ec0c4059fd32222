"""Test support: run compiled conditions over users stored the way the loader stores them.

Used by the compiler tests, the property-based comparison with the reference evaluator and the
pipeline tests. Real DuckDB, real compiler; nothing is mocked.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import duckdb
from sqlglot import exp

from audiences.conditions.compiler import (
    CompileContext,
    Condition,
    attribute_expression,
    attributes_used,
    compile_segments,
    property_json,
    render,
    timestamp_literal,
)
from audiences.dbt.models import flattened_columns, generate_models
from audiences.warehouse.schema import ensure_user_tables

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_TIME = "2026-11-01T00:00:00Z"
NOW = datetime(2026, 11, 1, tzinfo=UTC)


def connect_memory() -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect()
    connection.execute("set TimeZone = 'UTC'")
    return connection


def insert_users(connection: duckdb.DuckDBPyConnection, users: list[dict]) -> None:
    """Store users as the loader does: properties merged into `{}` (so nulls are removed)."""
    ensure_user_tables(connection)
    for key, user in enumerate(users, start=1):
        properties = {name: value for name, value in user.items() if name != "id"}
        connection.execute(
            "insert into raw.users values ($key, $id, json_merge_patch('{}', $properties::json), 'test', now(), now(), null)",
            {"key": key, "id": user["id"], "properties": json.dumps(properties)},
        )


def matching_ids(
    connection: duckdb.DuckDBPyConnection,
    segments: list[list[Condition]],
    now: datetime = NOW,
    flattened: bool = False,
    members: dict[str, set[str]] | None = None,
) -> set[str]:
    """Ids of the users in `raw.users` matching the segments, through the compiled SQL.

    `flattened=False` reads attributes straight from JSON (as `preview` can); `flattened=True`
    first builds the same typed-column table the dbt model builds, and reads from it.
    """
    members = members or {}

    def audience_members(key: str) -> exp.Expression:
        ids = sorted(members.get(key, set()))
        listed = (
            exp.Array(expressions=[exp.Literal.string(i) for i in ids])
            if ids
            else exp.cast(exp.Array(), "varchar[]")
        )
        return (
            exp.select("user_key")
            .from_("raw.users")
            .where(exp.func("list_contains", listed, exp.column("user_id")))
        )

    if flattened:
        _build_flattened(
            connection, sorted(attributes_used(segments), key=lambda a: (a.path, a.variant))
        )
        source = "flattened"
        attribute = lambda a: exp.column(a.column_name, quoted=True)  # noqa: E731
    else:
        source = "raw.users"
        attribute = lambda a: attribute_expression(  # noqa: E731 (as the branch above)
            property_json(a.path, exp.column("properties"), exp.column("user_id")), a.variant
        )
    context = CompileContext(
        attribute=attribute,
        audience_members=audience_members,
        evaluation_time=timestamp_literal(now),
        user_key=exp.column("user_key"),
        user_id=exp.column("user_id"),
    )
    condition = render(compile_segments(segments, context))
    return {
        row[0]
        for row in connection.execute(f"select user_id from {source} where {condition}").fetchall()
    }


def model_matching_ids(
    connection: duckdb.DuckDBPyConnection,
    segments: list[list[dict]],
    now: datetime = NOW,
    members: dict[str, set[str]] | None = None,
) -> set[str]:
    """Ids of the users matching these conditions (raw JSON, as in an audience.json) through the
    generated dbt model of an audience holding them: the file `audiences generate` writes, its Jinja
    rendered with Jinja (as dbt does; `ref`, `config` and `evaluation_time()` supplied here) and run
    over the same typed columns `int_users_flattened` builds. Other audiences (`is_audience_member`)
    are static ones whose members are `members`."""
    import jinja2

    from audiences.conditions.definitions import parse_definition

    members = members or {}
    key = "under-test"
    raw = {
        "name": "Under test",
        "type": "dynamic",
        "segments": [{"conditions": segment} for segment in segments],
    }
    definitions = {key: parse_definition(raw, key, Path(key) / "audience.json")}
    for other in sorted(
        {
            c["argument"]
            for segment in segments
            for c in segment
            if c.get("operator") in ("is_audience_member", "is_not_audience_member")
        }
    ):
        definitions[other] = parse_definition(
            {"name": other, "type": "static"}, other, Path(other) / "audience.json"
        )
    files = {
        str(f.path): f.text for f in generate_models(definitions, ROOT / "dbt_project", "audiences")
    }
    model = files[f"models/audiences/dynamic/{definitions[key].model_name}.sql"]
    _build_flattened(
        connection,
        sorted(attributes_used(definitions[key].segments), key=lambda a: (a.path, a.variant)),
    )

    def ref(name: str) -> str:
        if name == "int_users_flattened":
            return "flattened"
        ids = sorted(members.get(name.replace("_", "-"), members.get(name, set())))
        listed = render(
            exp.Array(expressions=[exp.Literal.string(i) for i in ids])
            if ids
            else exp.cast(exp.Array(), "varchar[]"),
            pretty=False,
        )
        return f"(select user_key, cast(null as varchar) as tenant from raw.users where list_contains({listed}, user_id))"

    sql = (
        jinja2.Environment(extensions=["jinja2.ext.do"])
        .from_string(model)
        .render(
            ref=ref,
            config=lambda **_: "",
            evaluation_time=lambda: render(timestamp_literal(now), pretty=False),
            source=lambda schema, table: f"{schema.replace('warehouse', 'raw')}.{table}",
        )
    )
    return {row[0] for row in connection.execute(f"select user_id from ({sql})").fetchall()}


def _build_flattened(connection: duckdb.DuckDBPyConnection, attributes: list) -> None:
    extraction, columns = flattened_columns(attributes)
    selected = ", ".join(["user_key", "user_id"] + [f"{sql} as {name}" for _, sql, name in columns])
    connection.execute(
        f"create or replace temp table flattened as select {selected} "
        f"from (select user_key, user_id, {extraction} as property_values from raw.users)"
    )


def copy_store(source: Path, target: Path) -> None:
    """Copy a SQLite store consistently (its WAL included) with SQLite's own backup."""
    import sqlite3

    with sqlite3.connect(source) as origin, sqlite3.connect(target) as copy:
        origin.backup(copy)


def copy_dbt_project(target: Path) -> Path:
    """A copy of the engine's dbt project at `target`, without dbt's output (`target/`, `logs/`):
    a test that runs the pipeline writes there, never into the repository's working tree."""
    import shutil

    shutil.copytree(
        ROOT / "dbt_project", target, ignore=shutil.ignore_patterns("target", "logs", "*.duckdb")
    )
    return target


def dbt_project_files(project: Path) -> dict[str, bytes]:
    """The files of a dbt project that people and `audiences generate` write (models, macros,
    project and profile files), by relative path."""
    return {
        str(path.relative_to(project)): path.read_bytes()
        for folder in ("models", "macros")
        for path in sorted((project / folder).rglob("*"))
        if path.is_file()
    } | {name: (project / name).read_bytes() for name in ("dbt_project.yml", "profiles.yml")}


FILE_SINKS = "default: file\nsinks:\n  file: {type: file, path: out/triggers.jsonl}\n"


def copy_sample_run(sample_run: Path, folder: Path) -> None:
    """The session's sample run, copied into `folder` for one test to change: `warehouse.duckdb`,
    `store.sqlite`, and a `sinks.yml` whose file sink writes `out/triggers.jsonl` there."""
    import shutil

    shutil.copy(sample_run, folder / "warehouse.duckdb")
    copy_store(sample_run.parent / "store.sqlite", folder / "store.sqlite")
    (folder / "sinks.yml").write_text(FILE_SINKS)


def evaluation_warehouse(users: list[dict]) -> duckdb.DuckDBPyConnection:
    """An in-memory warehouse with these users and empty evaluation tables (catalog, members),
    standing in for what dbt builds, so membership diffs can be tested without running dbt."""
    connection = connect_memory()
    insert_users(connection, users)
    connection.execute(
        "create table main.audience_catalog (audience_key varchar, audience_version varchar, "
        "audience_type varchar, is_skipped boolean not null default false)"
    )
    connection.execute(
        "create table main.audience_members (audience_key varchar, user_key integer, tenant varchar)"
    )
    return connection


def set_evaluation(
    connection: duckdb.DuckDBPyConnection,
    members: dict[str, list],
    versions: dict[str, str] | None = None,
    skipped: tuple[str, ...] = (),
) -> None:
    """Replace the evaluation tables: `members` maps audience keys to user keys or (user key, tenant);
    `skipped` audiences are in the catalog as skipped (their definitions have errors)."""
    connection.execute("delete from main.audience_catalog")
    connection.execute("delete from main.audience_members")
    for key, users in members.items():
        connection.execute(
            "insert into main.audience_catalog (audience_key, audience_version, audience_type, "
            "is_skipped) values ($k, $v, 'dynamic', $s)",
            {"k": key, "v": (versions or {}).get(key, "v1"), "s": key in skipped},
        )
        for member in users:
            user_key, tenant = (member, None) if isinstance(member, int) else member
            connection.execute(
                "insert into main.audience_members values ($k, $u, $t)",
                {"k": key, "u": user_key, "t": tenant},
            )


def load_events(connection: duckdb.DuckDBPyConnection, events: list[dict], folder: Path) -> None:
    """Load events the way an event source does: written as a JSON-lines file (Segment's track
    shape) in `folder` and loaded by the real loader, quarantine and dedupe included."""
    from audiences.events.loading import EventSource, load_event_source

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"events_{len(list(folder.glob('*.jsonl'))):04d}.jsonl"
    path.write_text(
        "".join(json.dumps(event, ensure_ascii=False) + "\n" for event in events), encoding="utf-8"
    )
    load_event_source(connection, EventSource("tracks", "jsonl", path), NOW)


def init_project(folder: Path, patch) -> Path:
    """`audiences init` in `folder`, made the working folder, as the analyst "ana" and with none of
    the session's AUDIENCES_ variables: what a new user's commands see. `patch` is a pytest
    MonkeyPatch, which restores all of it."""
    from audiences import cli

    for name in [name for name in os.environ if name.startswith("AUDIENCES_")]:
        patch.delenv(name)
    patch.setenv("AUDIENCES_AUTHOR", "ana")
    assert cli.main(["init", str(folder)]) == 0
    patch.chdir(folder)
    return folder


def counted_compilations(patch) -> list[str]:
    """From now on (as in a new process: definitions parsed anew), the location of every condition
    the compiler compiles, in order; `patch` is pytest's monkeypatch."""
    import audiences.conditions.compiler as compiler_module
    from audiences.conditions.definitions import _parse_text

    compiled: list[str] = []
    real = compiler_module.compile_segments

    def counting(segments, *args, **kwargs):
        compiled.extend(condition.location for segment in segments for condition in segment)
        return real(segments, *args, **kwargs)

    patch.setattr(compiler_module, "compile_segments", counting)
    _parse_text.cache_clear()
    return compiled
