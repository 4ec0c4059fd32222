"""Loading event sources into raw.events: Segment's track shape, mappings, dedupe, quarantine, and
incremental loads (files already loaded, a table's ingestion-time watermark). Real DuckDB files."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import duckdb
import pytest

from audiences.events.loading import (
    EventSourceError,
    event_sources_from_file,
    load_event_source,
)

AT = datetime(2026, 11, 1, tzinfo=UTC)


def track(user, name, message_id, timestamp="2026-10-30T10:00:00Z", **properties) -> dict:
    return {
        "type": "track",
        "userId": user,
        "event": name,
        "timestamp": timestamp,
        "messageId": message_id,
        "properties": properties,
    }


def write_jsonl(path, rows) -> None:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))


def sources(tmp_path, text: str):
    (tmp_path / "sources.yml").write_text(text)
    return {source.name: source for source in event_sources_from_file(tmp_path / "sources.yml")}


def test_segment_tracks_load_once_per_message_id_and_bad_rows_are_quarantined_with_reasons(
    tmp_path,
):
    folder = tmp_path / "tracks"
    folder.mkdir()
    write_jsonl(
        folder / "2026-10-30.jsonl",
        [
            track("ann", "Order Completed", "m1", total=12),
            track("ann", "Order Completed", "m1", total=99),  # the same message again
            track(None, "Order Completed", "m2"),
            track("bob", "", "m3"),
            track("bob", "Signed Up", "m4", timestamp="yesterday"),
            track("bob", "Signed Up", "m5", timestamp="2026-02-30T00:00:00Z"),
            "{not json\n",
            track("ghost", "Signed Up", "m6"),  # nobody loaded this user yet: kept
        ],
    )
    source = sources(tmp_path, "events:\n  - name: segment\n    path: tracks\n")["segment"]
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    result = load_event_source(connection, source, AT)
    assert (result.rows_read, result.events_loaded, result.duplicates, result.rows_quarantined) == (
        8,
        2,
        1,
        5,
    )
    assert connection.execute(
        "select message_id, user_id, properties->>'$.total' from raw.events order by event_seq"
    ).fetchall() == [("m1", "ann", "12"), ("m6", "ghost", None)]
    reasons = dict(
        connection.execute("select row_number, reason from raw.events_quarantine").fetchall()
    )
    assert reasons[3] == "no user id (userId)"
    assert reasons[4] == "no event name (event)"
    assert reasons[5] == 'timestamp "yesterday" is not an ISO 8601 timestamp'
    assert "is not an ISO 8601 timestamp" in reasons[6]
    assert reasons[7] == "the line is not valid JSON"

    # Incremental: the same file is not read again; a new file is, and its repeats count once.
    assert load_event_source(connection, source, AT).rows_read == 0
    write_jsonl(
        folder / "2026-10-31.jsonl",
        [track("ann", "Order Completed", "m1"), track("ann", "Order Completed", "m7")],
    )
    again = load_event_source(connection, source, AT)
    assert (again.rows_read, again.events_loaded, again.duplicates, again.files_skipped) == (
        2,
        1,
        1,
        1,
    )
    assert connection.execute("select count(*) from raw.events").fetchone()[0] == 3


def test_a_track_with_a_lone_surrogate_escape_is_quarantined_and_the_rest_loads(tmp_path):
    # `"\ud800"` is valid JSON but not Unicode text: such a line failed the whole load with a
    # UnicodeEncodeError. Now it is quarantined with the file and line; the others load.
    path = tmp_path / "tracks.jsonl"
    write_jsonl(
        path,
        [
            track("ann", "Order Completed", "m1", note="\ud800"),
            track("ann", "Order \udc00", "m2"),
            track("ann", "Order Completed", "m3", note="\ud83d\ude00"),  # a valid pair
        ],
    )
    source = sources(tmp_path, "events:\n  - name: segment\n    path: tracks.jsonl\n")["segment"]
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    result = load_event_source(connection, source, AT)
    assert (result.rows_read, result.events_loaded, result.rows_quarantined) == (3, 1, 2)
    assert connection.execute(
        "select message_id, properties->>'$.note' from raw.events"
    ).fetchall() == [("m3", "\U0001f600")]
    assert connection.execute(
        "select row_number, reason from raw.events_quarantine order by row_number"
    ).fetchall() == [
        (1, f"{path}, line 1: `\\ud800` is a lone surrogate, not Unicode text"),
        (2, f"{path}, line 2: `\\udc00` is a lone surrogate, not Unicode text"),
    ]


def test_a_warehouse_tracks_table_is_mapped_and_read_past_its_ingestion_watermark(tmp_path):
    origin = duckdb.connect(str(tmp_path / "segment.duckdb"))
    origin.execute(
        "create table tracks (id varchar, user_id varchar, event varchar, "
        "timestamp timestamptz, received_at timestamptz, total double)"
    )
    origin.execute(
        "insert into tracks values ('t1', 'ann', 'Order Completed', '2026-10-30 10:00:00+00', "
        "'2026-10-30 10:00:05+00', 12.5), ('t2', 'bob', 'Order Completed', '2026-10-30 11:00:00+00', "
        "'2026-10-30 11:00:05+00', 3)"
    )
    origin.close()
    text = """
events:
  - name: warehouse_tracks
    path: segment.duckdb
    query: "select *, struct_pack(total := total) as props from tracks"
    columns: {message_id: id, user_id: user_id, event: event, timestamp: timestamp, properties: props}
    loaded_at_column: received_at
"""
    source = sources(tmp_path, text)["warehouse_tracks"]
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    assert load_event_source(connection, source, AT).events_loaded == 2
    assert connection.execute(
        "select user_id, \"timestamp\", properties->>'$.total' from raw.events order by event_seq"
    ).fetchall()[0] == ("ann", datetime(2026, 10, 30, 10, tzinfo=UTC), "12.5")
    origin = duckdb.connect(str(tmp_path / "segment.duckdb"))
    origin.execute(
        "insert into tracks values ('t3', 'ann', 'Signed Up', '2026-10-31 09:00:00+00', "
        "'2026-10-31 09:00:01+00', null)"
    )
    origin.close()
    later = load_event_source(connection, source, AT)
    assert (later.rows_read, later.events_loaded) == (1, 1)


def test_a_mapping_that_names_a_missing_column_is_one_line_naming_source_and_column(tmp_path):
    origin = duckdb.connect(str(tmp_path / "segment.duckdb"))
    origin.execute("create table tracks (id varchar, user_id varchar, event varchar)")
    origin.close()
    text = """
events:
  - name: warehouse_tracks
    path: segment.duckdb
    table: tracks
    columns: {message_id: id, user_id: user_id, event: event, timestamp: sent_at, properties: null}
"""
    source = sources(tmp_path, text)["warehouse_tracks"]
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    with pytest.raises(EventSourceError) as caught:
        load_event_source(connection, source, AT)
    assert str(caught.value).startswith("event source 'warehouse_tracks': no column 'sent_at'")
    assert "\n" not in str(caught.value)
    assert connection.execute("select count(*) from raw.events").fetchone()[0] == 0


def test_parquet_events_load_with_their_own_column_names(tmp_path):
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    connection.execute(
        f"copy (select 'p' || i as message_id, 'u' || (i % 3) as user_id, 'Page Viewed' as event, "
        f"timestamp '2026-10-01 00:00:00' + to_minutes(i) as ts from range(100) t(i)) "
        f"to '{tmp_path / 'events.parquet'}'"
    )
    text = (
        "events:\n  - name: pages\n    path: events.parquet\n"
        "    columns: {message_id: message_id, user_id: user_id, timestamp: ts, properties: null}\n"
    )
    result = load_event_source(connection, sources(tmp_path, text)["pages"], AT)
    assert (result.events_loaded, result.rows_quarantined) == (100, 0)
    assert connection.execute("select max(event_seq) from raw.events").fetchone()[0] == 100
