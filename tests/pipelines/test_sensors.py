"""The source-change sensor: a run when a source changes, none when nothing did."""

from __future__ import annotations

import json
import os
import sqlite3

import dagster as dg

from pipelines.defs.sensors import user_sources_changed


def evaluate(cursor: str | None):
    context = dg.build_sensor_context(cursor=cursor)
    return user_sources_changed(context)


def test_sensor_requests_a_run_when_a_file_source_changes(tmp_path, monkeypatch):
    source = tmp_path / "users.csv"
    source.write_text("id,plan\nu1,pro\n")
    monkeypatch.setenv("AUDIENCES_USERS_SOURCE", str(source))
    first = evaluate(None)
    assert len(first.run_requests) == 1 and first.cursor
    quiet = evaluate(first.cursor)
    assert quiet.run_requests in (None, []) and quiet.cursor == first.cursor
    source.write_text("id,plan\nu1,pro\nu2,free\n")
    os.utime(source, ns=(1, 2))
    changed = evaluate(quiet.cursor)
    [request] = changed.run_requests
    assert request.tags["audiences/changed_sources"] == "users"
    assert request.run_key == changed.cursor != quiet.cursor


def test_sensor_watches_a_table_watermark(tmp_path, monkeypatch):
    database = tmp_path / "app.db"
    with sqlite3.connect(database) as connection:
        connection.execute("create table users (id text, updated_at text)")
        connection.execute("insert into users values ('u1', '2026-11-01T00:00:00Z')")
    (tmp_path / "sources.yml").write_text(
        f"sources:\n  - name: app\n    path: {database}\n    table: users\n    watermark_column: updated_at\n    mode: stream\n")
    monkeypatch.delenv("AUDIENCES_USERS_SOURCE", raising=False)
    monkeypatch.setenv("AUDIENCES_SOURCES", str(tmp_path / "sources.yml"))
    first = evaluate(None)
    assert json.loads(first.cursor) == {"app": "2026-11-01T00:00:00Z"}
    assert evaluate(first.cursor).run_requests in (None, [])
    with sqlite3.connect(database) as connection:
        connection.execute("update users set updated_at = '2026-11-02T00:00:00Z'")
    assert len(evaluate(first.cursor).run_requests) == 1
