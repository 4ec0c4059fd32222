"""Loading users: every source kind, identify-style deep merges, snapshots, streams, quarantine."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pytest
from condition_harness import ROOT

from audiences.users import load_source
from audiences.users.sources import SourceError, UserSource, source_from_uri, sources_from_file

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def warehouse(tmp_path):
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    connection.execute("set TimeZone = 'UTC'")
    yield connection
    connection.close()


def users(connection) -> dict[str, dict]:
    rows = connection.execute(
        "select user_id, properties from raw.users where deleted_at is null"
    ).fetchall()
    return {user_id: json.loads(properties) for user_id, properties in rows}


def quarantine(connection) -> list[tuple]:
    return connection.execute(
        "select row_number, user_id, reason from raw.users_quarantine order by row_number"
    ).fetchall()


def csv_source(
    tmp_path: Path, text: str, mode="snapshot", name="users.csv", encoding="utf-8"
) -> UserSource:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return source_from_uri(str(path), mode=mode)


def test_csv_columns_map_to_knock_user_fields_nested_by_dots(warehouse, tmp_path):
    source = csv_source(
        tmp_path,
        "id,name,plan,address.city,properties\n"
        'u1,Ann,pro,Paris,"{""tags"": [""a""], ""nps"": 9}"\n',
    )
    result = load_source(warehouse, source, T0)
    assert result.users_inserted == 1
    assert users(warehouse) == {
        "u1": {"name": "Ann", "plan": "pro", "address": {"city": "Paris"}, "tags": ["a"], "nps": 9}
    }


def test_reloading_the_same_data_changes_nothing(warehouse, tmp_path):
    source = csv_source(tmp_path, "id,plan\nu1,pro\nu2,free\n")
    load_source(warehouse, source, T0)
    again = load_source(warehouse, source, T0 + timedelta(hours=1))
    assert (again.users_inserted, again.users_updated, again.users_unchanged) == (0, 0, 2)
    assert warehouse.execute("select max(updated_at) from raw.users").fetchone()[0] == T0


def test_a_run_whose_sources_disagree_but_end_where_they_began_changes_nothing(warehouse, tmp_path):
    from audiences.users.store import settle_run

    snapshot = csv_source(tmp_path, "id,plan,seats\nu1,free,3\nu2,free,5\nu3,free,7\n")
    stream = csv_source(tmp_path, "id,plan\nu1,pro\nu2,pro\n", mode="stream", name="stream.csv")

    def run(at, changes=None, changes_mode="stream"):
        load_source(warehouse, snapshot, at)
        load_source(warehouse, stream, at)
        if changes:
            load_source(
                warehouse, csv_source(tmp_path, changes, mode=changes_mode, name="changes.csv"), at
            )
        settled = settle_run(warehouse, at)
        rows = warehouse.execute(
            "select user_id, updated_at, deleted_at is not null from raw.users"
        ).fetchall()
        return settled, {user_id: (updated_at, deleted) for user_id, updated_at, deleted in rows}

    assert run(T0)[0] == 0  # new users: nothing to go back to
    later = T0 + timedelta(hours=1)
    # The snapshot sets u1 and u2 back to free, the stream to pro again: as they were, so they keep T0.
    settled, rows = run(later)
    assert settled == 2
    assert rows == {"u1": (T0, False), "u2": (T0, False), "u3": (T0, False)}
    assert users(warehouse)["u1"] == {"plan": "pro", "seats": "3"}
    # A real change in the same kind of run moves the user.
    even_later = T0 + timedelta(hours=2)
    settled, rows = run(even_later, changes="id,seats\nu2,6\n")
    assert settled == 1 and rows["u1"] == (T0, False) and rows["u2"] == (even_later, False)
    # Changed back, then deleted by a later snapshot of the same source in the run: a deletion,
    # which must keep the run's time so that the models see it.
    last = T0 + timedelta(hours=3)
    settled, rows = run(
        last, changes="id,plan\nu3,free\n", changes_mode="snapshot"
    )  # keeps only u3
    assert settled == 0 and rows["u1"] == (last, True) and rows["u2"] == (last, True)


def test_identify_deep_merges_and_null_removes(warehouse, tmp_path):
    first = tmp_path / "first.jsonl"
    first.write_text(
        json.dumps(
            {
                "id": "u1",
                "plan": "pro",
                "address": {"city": "Paris", "zip": "75001"},
                "trial_ends_at": "2026-02-01",
            }
        )
        + "\n"
    )
    load_source(warehouse, source_from_uri(str(first), mode="stream"), T0)
    update = tmp_path / "update.jsonl"
    update.write_text(
        json.dumps({"id": "u1", "address": {"city": "Lyon"}, "trial_ends_at": None}) + "\n"
    )
    result = load_source(
        warehouse, source_from_uri(str(update), mode="stream"), T0 + timedelta(days=1)
    )
    assert result.users_updated == 1
    assert users(warehouse)["u1"] == {"plan": "pro", "address": {"city": "Lyon", "zip": "75001"}}


def test_rows_for_one_id_apply_in_order_like_consecutive_identifies(warehouse, tmp_path):
    source = csv_source(tmp_path, "id,plan,seats\nu1,pro,3\nu1,,5\n")
    load_source(warehouse, source, T0)
    assert users(warehouse)["u1"] == {"seats": "5"}


def test_snapshot_deletes_missing_users_but_stream_does_not(warehouse, tmp_path):
    load_source(warehouse, csv_source(tmp_path, "id,plan\nu1,pro\nu2,free\n"), T0)
    result = load_source(
        warehouse, csv_source(tmp_path, "id,plan\nu1,pro\n"), T0 + timedelta(days=1)
    )
    assert result.users_deleted == 1
    assert set(users(warehouse)) == {"u1"}
    stream = csv_source(tmp_path, "id,plan\nu3,free\n", mode="stream", name="stream.csv")
    assert load_source(warehouse, stream, T0 + timedelta(days=2)).users_deleted == 0
    assert set(users(warehouse)) == {"u1", "u3"}


def test_snapshot_never_deletes_a_user_whose_row_was_quarantined(warehouse, tmp_path):
    load_source(warehouse, csv_source(tmp_path, "id,properties\nu1,\nu2,\n"), T0)
    result = load_source(
        warehouse, csv_source(tmp_path, "id,properties\nu1,\nu2,{broken\n"), T0 + timedelta(days=1)
    )
    assert (result.users_deleted, result.rows_quarantined) == (0, 1)
    assert set(users(warehouse)) == {"u1", "u2"}


def test_a_deleted_user_who_comes_back_starts_fresh(warehouse, tmp_path):
    load_source(warehouse, csv_source(tmp_path, "id,plan,seats\nu1,pro,3\n"), T0)
    load_source(warehouse, csv_source(tmp_path, "id,plan,seats\n"), T0 + timedelta(days=1))
    load_source(warehouse, csv_source(tmp_path, "id,name\nu1,Ann\n"), T0 + timedelta(days=2))
    assert users(warehouse) == {"u1": {"name": "Ann"}}
    assert warehouse.execute("select user_key from raw.users").fetchall() == [(1,)]


def test_bad_rows_are_quarantined_with_row_and_reason_and_the_rest_loads(warehouse, tmp_path):
    long_id = "x" * 256
    text = (
        "id,name,properties\n"
        "ok1,A,\n"
        ",Missing,\n"
        "   ,Blank,\n"
        " padded,Padded,\n"
        f"{long_id},Long,\n"
        '"tab\tid",Tab,\n'
        'ok2,B,"{bad json"\n'
        'ok3,C,"[1, 2]"\n'
        "ok4,D,\n"
    )
    result = load_source(warehouse, csv_source(tmp_path, text), T0)
    assert (result.rows_read, result.rows_quarantined, result.users_inserted) == (9, 7, 2)
    assert set(users(warehouse)) == {"ok1", "ok4"}
    reasons = {row: reason for row, _, reason in quarantine(warehouse)}
    assert reasons == {
        2: "id is missing",
        3: "id is blank",
        4: "id has leading or trailing whitespace",
        5: "id is longer than 255 characters",
        6: "id contains control characters",
        7: "`properties` is not a JSON object",
        8: "`properties` is not a JSON object",
    }
    raw = json.loads(
        warehouse.execute(
            "select raw_row from raw.users_quarantine where row_number = 7"
        ).fetchone()[0]
    )
    assert raw == {"id": "ok2", "name": "B", "properties": "{bad json"}


def test_csv_dialects_bom_semicolons_quoted_newlines_and_legacy_encoding(warehouse, tmp_path):
    text = '\ufeffid;name;city\nu1;"Zoë\nSecond line";Köln\n\nu2;Ann;"Paris; France"\n'
    load_source(warehouse, csv_source(tmp_path, text.encode("utf-8"), name="bom.csv"), T0)
    assert users(warehouse)["u1"] == {"name": "Zoë\nSecond line", "city": "Köln"}
    assert users(warehouse)["u2"]["city"] == "Paris; France"
    legacy = csv_source(
        tmp_path, "id,name\nu3,Andr\xe9\n", name="legacy.csv", encoding="cp1252", mode="stream"
    )
    load_source(warehouse, legacy, T0)
    assert users(warehouse)["u3"] == {"name": "André"}


def test_parquet_keeps_types_structs_lists_and_times(warehouse, tmp_path):
    frame = pl.DataFrame(
        {
            "id": ["u1", "u2"],
            "seats": [3, None],
            "mrr": [49.5, 0.0],
            "is_verified": [True, False],
            "signed_up_at": [datetime(2025, 6, 15, 14, 30, tzinfo=UTC), None],
            "address": [{"city": "Paris", "country": "FR"}, {"city": None, "country": "PE"}],
            "feature_flags": [["beta"], []],
        }
    )
    frame.write_parquet(tmp_path / "users.parquet")
    load_source(warehouse, source_from_uri(str(tmp_path / "users.parquet")), T0)
    assert users(warehouse) == {
        "u1": {
            "seats": 3,
            "mrr": 49.5,
            "is_verified": True,
            "signed_up_at": "2025-06-15T14:30:00Z",
            "address": {"city": "Paris", "country": "FR"},
            "feature_flags": ["beta"],
        },
        "u2": {"mrr": 0.0, "is_verified": False, "address": {"country": "PE"}, "feature_flags": []},
    }


def test_a_folder_of_parquet_files_is_one_source(warehouse, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    pl.DataFrame({"id": ["a"], "n": [1]}).write_parquet(folder / "part-0.parquet")
    pl.DataFrame({"id": ["b"], "n": [2]}).write_parquet(folder / "part-1.parquet")
    load_source(warehouse, source_from_uri(str(folder)), T0)
    assert users(warehouse) == {"a": {"n": 1}, "b": {"n": 2}}


def test_sqlite_table_and_duckdb_query_sources(warehouse, tmp_path):
    database = tmp_path / "app.db"
    with sqlite3.connect(database) as connection:
        connection.execute(
            "create table accounts (user_id text, plan text, seats integer, properties text)"
        )
        connection.execute(
            """insert into accounts values ('s1', 'pro', 3, '{"region": "eu"}'), (NULL, 'x', 1, NULL)"""
        )
    source = source_from_uri(f"sqlite:///{database}?table=accounts&id_column=user_id")
    result = load_source(warehouse, source, T0)
    assert (result.users_inserted, result.rows_quarantined) == (1, 1)
    assert users(warehouse)["s1"] == {"plan": "pro", "seats": 3, "region": "eu"}

    other = tmp_path / "analytics.duckdb"
    with duckdb.connect(str(other)) as connection:
        connection.execute(
            "create table people as select 'd1' as id, 'free' as plan, [1, 2] as scores"
        )
    load_source(
        warehouse,
        source_from_uri(f"duckdb:///{other}?query=select * from people", mode="stream"),
        T0,
    )
    assert users(warehouse)["d1"] == {"plan": "free", "scores": [1, 2]}


def test_unreadable_sources_fail_with_the_file_named(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        load_source(duckdb.connect(), source_from_uri(str(tmp_path / "absent.csv")), T0)
    (tmp_path / "noid.csv").write_text("name\nAnn\n")
    with pytest.raises(SourceError, match=r"noid\.csv: no `id` column"):
        load_source(duckdb.connect(), source_from_uri(str(tmp_path / "noid.csv")), T0)


def test_sources_file_resolves_paths_beside_it(tmp_path):
    (tmp_path / "sources.yml").write_text(
        "sources:\n  - name: crm\n    path: users.csv\n    mode: stream\n"
    )
    [source] = sources_from_file(tmp_path / "sources.yml")
    assert (source.location, source.format, source.mode) == (
        tmp_path / "users.csv",
        "csv",
        "stream",
    )
    (tmp_path / "bad.yml").write_text(
        "sources:\n  - name: crm\n    path: users.csv\n    mode: sometimes\n"
    )
    with pytest.raises(SourceError, match="mode must be snapshot or stream"):
        sources_from_file(tmp_path / "bad.yml")


def test_sample_csv_quarantines_its_messy_rows_and_loads_the_rest(warehouse):
    [crm, updates] = sources_from_file(ROOT / "data" / "sources.yml")
    result = load_source(warehouse, crm, T0)
    assert result.rows_read == 3000
    assert (
        result.rows_quarantined == 26 + 10
    )  # bad rows, and the first of each of ten ids that appear twice
    assert result.users_inserted == 3000 - 26 - 10
    reasons = {reason for _, _, reason in quarantine(warehouse)}
    assert {
        "id is missing",
        "id is blank",
        "id is longer than 255 characters",
        "`properties` is not a JSON object",
    } <= reasons
    assert len([reason for reason in reasons if reason.startswith("duplicate id")]) == 10
    assert (
        "duplicate id 'user_00062' on rows 62 and 282: the last (row 282) was loaded, this row was not"
        in reasons
    )
    streamed = load_source(warehouse, updates, T0 + timedelta(days=1))
    assert (
        streamed.rows_quarantined == 0
        and streamed.users_deleted == 0
        and streamed.users_updated > 0
    )


def test_a_snapshot_reports_a_duplicate_id_and_keeps_its_last_row(warehouse, tmp_path):
    source = csv_source(
        tmp_path,
        "id,plan,seats,properties\n"
        'u1,pro,3,"{""region"": ""eu""}"\nu2,free,1,\nu1,starter,5,\nu1,enterprise,9,\n',
    )
    result = load_source(warehouse, source, T0)
    assert (result.rows_read, result.rows_quarantined, result.users_inserted) == (4, 2, 2)
    # The last row of u1 is loaded alone: the first row's properties are not merged in.
    assert users(warehouse) == {
        "u1": {"plan": "enterprise", "seats": "9"},
        "u2": {"plan": "free", "seats": "1"},
    }
    reported = "duplicate id 'u1' on rows 1, 3 and 4: the last (row 4) was loaded, this row was not"
    assert quarantine(warehouse) == [(1, "u1", reported), (3, "u1", reported)]
    raw = [
        json.loads(row)
        for (row,) in warehouse.execute(
            "select raw_row from raw.users_quarantine order by row_number"
        ).fetchall()
    ]
    assert [row["plan"] for row in raw] == ["pro", "starter"]
    # The next snapshot without the duplicate empties the report, and deletes nobody.
    fixed = load_source(
        warehouse,
        csv_source(tmp_path, "id,plan,seats\nu1,enterprise,9\nu2,free,1\n"),
        T0 + timedelta(hours=1),
    )
    assert (fixed.rows_quarantined, fixed.users_deleted, quarantine(warehouse)) == (0, 0, [])


def test_a_stream_applies_every_row_of_an_id_in_order_without_a_report(warehouse, tmp_path):
    stream = tmp_path / "updates.jsonl"
    stream.write_text(
        json.dumps({"id": "u1", "plan": "pro"}) + "\n" + json.dumps({"id": "u1", "seats": 3}) + "\n"
    )
    result = load_source(warehouse, source_from_uri(str(stream), mode="stream"), T0)
    assert (result.rows_quarantined, quarantine(warehouse)) == (0, [])
    assert users(warehouse) == {"u1": {"plan": "pro", "seats": 3}}


def test_a_latin_1_json_lines_file_is_quarantined_naming_the_file_the_line_and_utf_8(
    warehouse, tmp_path
):
    path = tmp_path / "people.jsonl"
    path.write_bytes(
        b'{"id": "u1", "name": "Ann"}\n\n'
        + '{"id": "u2", "name": "Ren\u00e9e"}\n'.encode("latin-1")
        + '{"id": "u3", "name": "Zo\u00eb"}\n'.encode("utf-8")
    )
    result = load_source(warehouse, source_from_uri(str(path)), T0)
    assert (result.rows_quarantined, set(users(warehouse))) == (1, {"u1", "u3"})
    assert users(warehouse)["u3"] == {"name": "Zoë"}
    assert quarantine(warehouse) == [
        (
            2,
            "u2",
            f"{path}, line 3: byte 0xE9 (column 26) is not valid UTF-8; the file must be encoded in UTF-8",
        )
    ]


def test_a_csv_row_with_more_or_fewer_fields_than_the_header_is_quarantined_by_line(
    warehouse, tmp_path
):
    # A row with a field too many failed the whole load (polars: "found more fields than
    # defined"); a row with a field too few was read with nulls, which in a stream *removed*
    # the user's properties. Both are quarantined now, naming the line, as an upload rejects
    # them; a snapshot keeps their users (not deleted).
    first = csv_source(tmp_path, "id,plan,seats\nu1,pro,3\nu2,free,1\nu3,pro,9\n", mode="stream")
    load_source(warehouse, first, T0)
    source = csv_source(
        tmp_path,
        "id,plan,seats\n"
        'u1,"team\nplan",4\n'  # lines 2-3: one row over two lines
        "u2,enterprise\n"  # line 4: a field short
        "u3,pro,9,extra\n"  # line 5: a field too many
        "u4,free,\n",  # an empty cell is not a missing field
        mode="stream",
    )
    result = load_source(warehouse, source, T0 + timedelta(hours=1))
    assert (result.rows_quarantined, users(warehouse)) == (
        2,
        {
            "u1": {"plan": "team\nplan", "seats": "4"},
            "u2": {"plan": "free", "seats": "1"},
            "u3": {"plan": "pro", "seats": "9"},
            "u4": {"plan": "free"},
        },
    )
    assert quarantine(warehouse) == [
        (2, "u2", "line 4: 2 fields where the header has 3"),
        (3, "u3", "line 5: 4 fields where the header has 3"),
    ]
    snapshot = csv_source(tmp_path, "id,plan\nu1,pro\nu2\nu3,pro,x\n", name="all.csv")
    again = load_source(warehouse, snapshot, T0 + timedelta(hours=2))
    assert (again.rows_quarantined, again.users_deleted) == (2, 1)  # u4 only
    assert set(users(warehouse)) == {"u1", "u2", "u3"}


def test_a_json_line_whose_id_is_no_text_nor_whole_number_is_quarantined(warehouse, tmp_path):
    # `{"id": true}` loaded a user "true", `{"id": 1.5}` a user "1.5", `{"id": {"a": 1}}` a user
    # '{"a": 1}': malformed ids that were silently accepted. A whole number is an id, as in CSV.
    path = tmp_path / "people.jsonl"
    path.write_text(
        '{"id": 7, "plan": "pro"}\n'
        '{"id": true, "plan": "pro"}\n'
        '{"id": 1.5, "plan": "pro"}\n'
        '{"id": ["u1"], "plan": "pro"}\n'
        '{"id": {"a": 1}, "plan": "pro"}\n'
    )
    result = load_source(warehouse, source_from_uri(str(path)), T0)
    assert (result.rows_quarantined, users(warehouse)) == (4, {"7": {"plan": "pro"}})
    assert quarantine(warehouse) == [
        (2, "true", f"{path}, line 2: id is a boolean (true), not text or a whole number"),
        (3, "1.5", f"{path}, line 3: id is a fractional number (1.5), not text or a whole number"),
        (4, '["u1"]', f"{path}, line 4: id is a list, not text or a whole number"),
        (5, '{"a": 1}', f"{path}, line 5: id is an object, not text or a whole number"),
    ]


def test_a_json_line_with_a_lone_surrogate_escape_is_quarantined_and_the_rest_loads(
    warehouse, tmp_path
):
    # JSON can spell a lone surrogate (`"\ud800"`), which is not Unicode text: such a line failed
    # the whole load with a UnicodeEncodeError. Now it is quarantined, naming the file and the line,
    # and a snapshot keeps the user it names (not deleted). A valid pair (an emoji) still loads.
    path = tmp_path / "people.jsonl"
    path.write_text(
        '{"id": "u1", "name": "Ann"}\n'
        '{"id": "u2", "name": "\\ud800 broken"}\n'
        '{"id": "u3\\udfff", "name": "Cy"}\n'
        '{"id": "u4", "name": "\\ud83d\\ude00"}\n'
    )
    result = load_source(warehouse, source_from_uri(str(path)), T0)
    assert (result.rows_quarantined, users(warehouse)) == (
        2,
        {"u1": {"name": "Ann"}, "u4": {"name": "\U0001f600"}},
    )
    assert quarantine(warehouse) == [
        (2, "u2", f"{path}, line 2: `\\ud800` is a lone surrogate, not Unicode text"),
        (3, "u3\ufffd", f"{path}, line 3: `\\udfff` is a lone surrogate, not Unicode text"),
    ]
    path.write_text('{"id": "u1", "name": "Ann"}\n{"id": "u4", "name": "\\udc00"}\n')
    again = load_source(warehouse, source_from_uri(str(path)), T0 + timedelta(hours=1))
    assert (again.rows_quarantined, again.users_deleted, set(users(warehouse))) == (
        1,
        0,
        {"u1", "u4"},
    )


def test_a_json_line_with_nan_or_infinity_is_quarantined_saying_why(warehouse, tmp_path):
    # Python's JSON reader takes NaN, Infinity and 1e400, which JSON has not. Such a line was
    # quarantined as "`properties` is not a JSON object", which sent users looking at the wrong
    # thing; the reason now names the number. The words inside a string are no number.
    path = tmp_path / "people.jsonl"
    path.write_text(
        '{"id": "u1", "score": NaN}\n'
        '{"id": "u2", "score": 1e400}\n'
        '{"id": "u3", "score": -Infinity}\n'
        '{"id": "u4", "score": 1.5, "note": "NaN or Infinity"}\n'
    )
    result = load_source(warehouse, source_from_uri(str(path)), T0)
    assert (result.rows_quarantined, users(warehouse)) == (
        3,
        {"u4": {"score": 1.5, "note": "NaN or Infinity"}},
    )
    assert quarantine(warehouse) == [
        (1, "u1", f"{path}, line 1: NaN is not a JSON number"),
        (2, "u2", f"{path}, line 2: 1e400 is beyond what a JSON number can hold"),
        (3, "u3", f"{path}, line 3: -Infinity is not a JSON number"),
    ]


def test_a_csv_with_bad_bytes_is_quarantined_by_line_and_the_rest_is_not_garbled(
    warehouse, tmp_path
):
    path = tmp_path / "crm.csv"
    path.write_bytes(
        'id,name,city\nu1,"Zoë\nSecond line",Köln\nu2,Ann,'.encode()
        + b"Montr\xe9al\n"
        + "u3,Ren\u00e9e,東京\n".encode("utf-8")
    )
    result = load_source(warehouse, source_from_uri(str(path)), T0)
    assert (result.rows_quarantined, set(users(warehouse))) == (1, {"u1", "u3"})
    assert users(warehouse)["u1"] == {"name": "Zoë\nSecond line", "city": "Köln"}
    assert users(warehouse)["u3"] == {"name": "Renée", "city": "東京"}
    assert quarantine(warehouse) == [
        (
            2,
            "u2",
            f"{path}, line 4: byte 0xE9 (column 13) is not valid UTF-8; the file must be encoded in UTF-8",
        )
    ]
    # A Windows-1252 export is read as such; a byte it leaves undefined is named the same way.
    legacy = tmp_path / "legacy.csv"
    legacy.write_bytes(b"id,name\r\nu4,Andr\xe9\r\nu5,Bad\x81byte\r\n")
    load_source(warehouse, source_from_uri(str(legacy), mode="stream"), T0)
    assert users(warehouse)["u4"] == {"name": "André"}
    [(_, user_id, reason)] = warehouse.execute(
        "select row_number, user_id, reason from raw.users_quarantine where location = $l",
        {"l": str(legacy)},
    ).fetchall()
    assert (user_id, reason) == (
        "u5",
        f"{legacy}, line 3: byte 0x81 (column 7) is not valid UTF-8, nor "
        "Windows-1252; the file must be encoded in UTF-8",
    )


def test_a_source_row_unchanged_since_its_last_load_keeps_newer_identifies(
    warehouse, tmp_path, store
):
    """Issue 23: 540 users identified through the API were put back to a snapshot file's values by
    the next run, though the file had not changed. Last change wins, per source row and identify:
    an unchanged row changes nothing, a changed row wins over an older identify."""
    from audiences.store.profiles import identify, load_identify_queue

    snapshot = UserSource("crm", "csv", tmp_path / "crm.csv", mode="snapshot")
    stream = UserSource("updates", "jsonl", tmp_path / "updates.jsonl", mode="stream")
    snapshot.location.write_text("id,plan,seats\nu1,free,3\nu2,free,5\nu3,free,7\n")
    stream.location.write_text('{"id": "u3", "plan": "pro"}\n')

    def run(at):
        results = [
            load_source(warehouse, snapshot, at),
            load_source(warehouse, stream, at),
            load_identify_queue(warehouse, store, at),
        ]
        return results, warehouse.execute(
            "select user_id, updated_at from raw.users order by 1"
        ).fetchall()

    run(T0)
    with store.engine.begin() as connection:
        identify(
            store,
            connection,
            [("u1", {"plan": "pro"}), ("u2", {"plan": "enterprise", "seats": None})],
        )
    run(T0 + timedelta(hours=1))
    assert users(warehouse) == {
        "u1": {"plan": "pro", "seats": "3"},
        "u2": {"plan": "enterprise"},
        "u3": {"plan": "pro", "seats": "7"},
    }
    # The next run reads the same files: nothing reverts, nobody's updated_at moves.
    later = T0 + timedelta(hours=2)
    (crm, updates, _), rows = run(later)
    assert users(warehouse)["u1"] == {"plan": "pro", "seats": "3"}
    assert users(warehouse)["u2"] == {"plan": "enterprise"}
    assert all(updated_at < later for _, updated_at in rows)
    assert (
        crm.users_updated,
        crm.rows_unchanged,
        updates.users_updated,
        updates.rows_unchanged,
    ) == (0, 3, 0, 1)
    # The file changes u2's row: the source's change is now the newest, its whole row applies.
    # u1's row did not change, so u1 keeps what identify wrote.
    snapshot.location.write_text("id,plan,seats\nu1,free,3\nu2,free,6\nu3,free,7\n")
    (crm, _, _), _ = run(T0 + timedelta(hours=3))
    assert crm.users_updated == 1
    assert users(warehouse) == {
        "u1": {"plan": "pro", "seats": "3"},
        "u2": {"plan": "free", "seats": "6"},
        "u3": {"plan": "pro", "seats": "7"},
    }
    # A row that leaves the snapshot deletes its user; coming back, it is a change again.
    snapshot.location.write_text("id,plan,seats\nu1,free,3\nu3,free,7\n")
    run(T0 + timedelta(hours=4))
    assert set(users(warehouse)) == {"u1", "u3"}
    snapshot.location.write_text("id,plan,seats\nu1,free,3\nu2,free,6\nu3,free,7\n")
    run(T0 + timedelta(hours=5))
    assert users(warehouse)["u2"] == {"plan": "free", "seats": "6"}
    # An identify that deletes a user is not undone by the unchanged row either.
    from audiences.store.profiles import delete_user

    with store.engine.begin() as connection:
        delete_user(store, connection, "u1")
    run(T0 + timedelta(hours=6))
    run(T0 + timedelta(hours=7))
    assert set(users(warehouse)) == {"u2", "u3"}


def test_an_empty_dotted_cell_removes_nothing_it_does_not_hold_and_creates_no_object(
    warehouse, tmp_path
):
    # An empty `address.city` gave every row `"address": {}`, so `not_empty address` matched all.
    # An empty cell is `null` (it removes the property); it never creates the object holding it.
    source = csv_source(
        tmp_path,
        "id,plan,address.city,address.geo.lat,address.zip\n"
        "u1,pro,,,\n"
        "u2,,Paris,,\n"
        "u3,free,,,75001\n",
        mode="stream",
    )
    load_source(warehouse, source, T0)
    assert users(warehouse) == {
        "u1": {"plan": "pro"},
        "u2": {"address": {"city": "Paris"}},
        "u3": {"plan": "free", "address": {"zip": "75001"}},
    }
    emptied = csv_source(
        tmp_path, "id,plan,address.city,address.zip\nu2,pro,,x\nu3,,,\n", mode="stream"
    )
    load_source(warehouse, emptied, T0 + timedelta(days=1))
    # An empty cell beside a given one removes its property; an all-empty object is left alone.
    assert users(warehouse) == {
        "u1": {"plan": "pro"},
        "u2": {"plan": "pro", "address": {"zip": "x"}},
        "u3": {"address": {"zip": "75001"}},
    }
