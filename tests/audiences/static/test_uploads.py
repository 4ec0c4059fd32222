"""CSV uploads into static audiences, against the hostile corpus in tests/data/csv/.

For each file: what went in, what was rejected and why, and that nothing else was lost.
"""

from __future__ import annotations

import csv
import json

import pytest
import sqlalchemy as sa
from condition_harness import ROOT

from audiences.static.uploads import UploadError, upload_csv

CORPUS = ROOT / "tests" / "data" / "csv"
TYPES = {"vips": "static", "pros": "dynamic"}


def members(store) -> set[tuple]:
    return {
        (row["user_id"], row["tenant"])
        for row in store.rows(
            sa.text("select user_id, tenant from audience_members where audience_key = 'vips'")
        )
    }


def patches(store) -> dict[str, dict]:
    merged: dict[str, dict] = {}
    for row in store.rows(sa.text("select user_id, patch from user_patches order by patch_id")):
        merged.setdefault(row["user_id"], {}).update(json.loads(row["patch"]))
    return merged


def rejects(result) -> list[dict]:
    with result.rejects_file.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def upload(store, name, tmp_path, **options):
    return upload_csv(
        store, "vips", CORPUS / name, TYPES, rejects_file=tmp_path / "rejects.csv", **options
    )


def test_bad_ids_are_rejected_with_row_and_reason(store, tmp_path):
    result = upload(store, "bad_ids.csv", tmp_path)
    assert (result.rows, result.members_added, result.rejected) == (5, 2, 3)
    assert members(store) == {("u1", None), ("u4", None)}
    assert {(r["row"], r["reason"]) for r in rejects(result)} == {
        ("2", "id has leading or trailing whitespace"),
        ("3", "id contains control characters"),
        ("4", "id is longer than 255 characters"),
    }
    assert patches(store)["u1"] == {"name": "Ann", "email": "ann@example.com"}


def test_empty_ids_are_rejected(store, tmp_path):
    result = upload(store, "empty_ids.csv", tmp_path)
    assert members(store) == {("u1", None), ("u2", None)}
    assert sorted((r["row"], r["reason"]) for r in rejects(result)) == [
        ("2", "id is missing"),
        ("3", "id is blank"),
        ("4", "id is blank"),
    ]


def test_wrong_encoding_is_read_as_windows_1252(store, tmp_path):
    result = upload(store, "wrong_encoding_cp1252.csv", tmp_path)
    assert (result.members_added, result.rejected) == (2, 0)
    assert patches(store) == {
        "u1": {"name": "André", "city": "Köln"},
        "u2": {"name": "Renée", "city": "Zürich"},
    }


def test_formulas_are_data_and_are_neutralised_in_the_rejects_file(store, tmp_path):
    result = upload(store, "formula_injection.csv", tmp_path)
    assert patches(store)["u1"]["name"] == "=cmd|' /C calc'!A0"  # stored as the text it is
    assert patches(store)["u2"]["company"] == "@evil"
    assert members(store) == {("u1", None), ("u2", None)}
    [rejected] = rejects(result)
    assert (rejected["row"], rejected["reason"]) == ("3", "id contains control characters")
    assert rejected["id"] == "'=bad\tid"  # a spreadsheet shows it as text instead of running it
    assert not any(value.startswith(("=", "+", "-", "@")) for value in rejected.values())


def test_bom_quoted_newlines_duplicates_and_blank_lines(store, tmp_path):
    result = upload(store, "bom_quoted_newlines_duplicates_blank_lines.csv", tmp_path)
    assert (
        result.blank_lines,
        result.rejected,
        result.members_added,
        result.members_unchanged,
    ) == (1, 0, 2, 0)
    assert patches(store)["u1"] == {"name": "Ann", "notes": "line one\nline two"}


def test_semicolons_mapping_and_one_user_under_three_tenants(store, tmp_path):
    result = upload(
        store,
        "semicolons_with_tenants.csv",
        tmp_path,
        mapping={"user": "id", "plan": "billing.plan"},
        tenant_column="tenant",
    )
    assert result.members_added == 4
    assert members(store) == {("u1", "acme"), ("u1", "globex"), ("u1", None), ("u2", "acme")}
    assert patches(store)["u1"] == {"billing": {"plan": "pro"}}
    # The store's copy of the user, which the API serves, has them at once.
    from audiences.store.profiles import get_profile

    assert get_profile(store, "u1").properties == {"billing": {"plan": "pro"}}
    again = upload(
        store,
        "semicolons_with_tenants.csv",
        tmp_path,
        mapping={"user": "id"},
        tenant_column="tenant",
    )
    assert (again.members_added, again.members_unchanged) == (0, 4)


def test_a_file_over_the_limit_is_refused(store, tmp_path):
    big = tmp_path / "ten_mb_plus_one_byte.csv"
    header = b"id,name\n"
    row = b"user_000000,padding-padding-padding-padding\n"
    body = header + row * ((10 * 1024 * 1024 - len(header)) // len(row))
    big.write_bytes(body + b"x" * (10 * 1024 * 1024 + 1 - len(body)))
    assert big.stat().st_size == 10 * 1024 * 1024 + 1
    with pytest.raises(
        UploadError, match=r"10,485,761 bytes is over the upload limit of 10,485,760 bytes"
    ):
        upload_csv(store, "vips", big, TYPES)
    assert members(store) == set()


def test_a_hundred_thousand_rows_go_in_and_bad_ones_are_reported(store, tmp_path):
    path = tmp_path / "rows_100k.csv"
    lines = ["id,name,plan"] + [
        (f"user_{i:06d}" if i % 100 else f" bad_{i}") + f",User {i},pro" for i in range(100_000)
    ]
    path.write_text("\n".join(lines) + "\n")
    result = upload_csv(store, "vips", path, TYPES, rejects_file=tmp_path / "rejects.csv")
    assert (result.rows, result.rejected, result.members_added) == (100_000, 1_000, 99_000)
    assert len(members(store)) == 99_000
    assert store.rows(sa.text("select count(*) as n from membership_events"))[0]["n"] == 99_000


def test_adding_to_a_dynamic_audience_is_refused(store):
    with pytest.raises(ValueError, match="'pros' is a dynamic audience"):
        upload_csv(store, "pros", CORPUS / "bad_ids.csv", TYPES)


def test_an_upload_merges_into_known_users_and_empty_cells_change_nothing(store, tmp_path):
    from audiences.store.profiles import get_profile, identify

    with store.engine.begin() as connection:
        identify(
            store,
            connection,
            [("u1", {"name": "Ann", "plan": "free", "address": {"city": "Lyon", "zip": "69001"}})],
        )
    path = tmp_path / "merge.csv"
    path.write_text(
        "id,name,address.city,address.zip,properties\n"
        'u1,,Paris,,"{""plan"": null, ""score"": 3}"\n'
        "u2,,,,\n"
        "u1,Anna,,,\n"
    )
    result = upload_csv(store, "vips", path, TYPES)
    # (a duplicate row of a member is one member: not counted as unchanged)
    assert (result.rows, result.members_added, result.members_unchanged, result.rejected) == (
        3,
        2,
        0,
        0,
    )
    # Per row: its `properties` JSON (a null removes), then its given cells, rows in file order.
    assert get_profile(store, "u1").properties == {
        "name": "Anna",
        "score": 3,
        "address": {"city": "Paris", "zip": "69001"},
    }
    # A row with no given cell adds the member and identifies nobody.
    assert get_profile(store, "u2") is None
    assert result.users_identified == 1
    assert members(store) == {("u1", None), ("u2", None)}
    queued = [
        json.loads(row["patch"])
        for row in store.rows(
            sa.text("select patch from user_patches where user_id = 'u1' order by patch_id")
        )
    ]
    assert queued[1:] == [
        {"plan": None, "score": 3},
        {"address": {"city": "Paris"}},
        {"name": "Anna"},
    ]


def test_a_row_with_thousands_of_columns_uploads_every_column(store, tmp_path):
    # 4,000 columns took 89 s (pandera read the whole schema once per column); bench/input_sizes.py
    # measures that the cost now grows linearly with the columns.
    path = tmp_path / "wide.csv"
    path.write_text(
        "id," + ",".join(f"c{i}" for i in range(4000)) + "\n"
        "u1," + ",".join(f"v{i}" for i in range(4000)) + "\n"
    )
    result = upload_csv(store, "vips", path, TYPES)
    assert (result.members_added, result.rejected) == (1, 0)
    from audiences.store.profiles import get_profile

    assert get_profile(store, "u1").properties == {f"c{i}": f"v{i}" for i in range(4000)}


def test_a_ragged_row_is_reported_with_its_line_and_the_others_are_read(store, tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text(
        "id,name,plan\n"
        'u1,"Ann\nSmith",pro\n'  # lines 2-3: one row over two lines
        "u2,Bob,free,extra,more\n"  # line 4: two fields too many
        "u3,Cy,pro\n"
        "u4,Di\n"  # line 6: a field short
        "u5,Ed,free\n"
    )
    result = upload_csv(store, "vips", path, TYPES, rejects_file=tmp_path / "rejects.csv")
    assert (result.rows, result.members_added, result.rejected) == (5, 3, 2)
    assert members(store) == {("u1", None), ("u3", None), ("u5", None)}
    assert patches(store)["u1"] == {"name": "Ann\nSmith", "plan": "pro"}
    assert [(r["row"], r["id"], r["reason"]) for r in rejects(result)] == [
        ("2", "u2", "line 4: 5 fields where the header has 3"),
        ("4", "u4", "line 6: 2 fields where the header has 3"),
    ]


def test_uploading_the_same_file_again_queues_no_patches_for_unchanged_users(store, tmp_path):
    path = tmp_path / "users.csv"
    path.write_text(
        'id,name,plan,properties\nu1,Ann,pro,"{""score"": 3, ""tags"": [""a""]}"\nu2,Bob,free,\n'
    )
    upload_csv(store, "vips", path, TYPES)
    queued = store.scalar(sa.text("select count(*) from user_patches"))
    again = upload_csv(store, "vips", path, TYPES)
    assert (again.members_added, again.members_unchanged) == (0, 2)
    assert store.scalar(sa.text("select count(*) from user_patches")) == queued
    # A user whose row changes is queued again, and only that user.
    path.write_text("id,name,plan\nu1,Ann,pro\nu2,Bob,pro\n")
    upload_csv(store, "vips", path, TYPES)
    new = store.rows(sa.text("select user_id, patch from user_patches order by patch_id"))[queued:]
    assert [(row["user_id"], json.loads(row["patch"])) for row in new] == [
        ("u2", {"name": "Bob", "plan": "pro"})
    ]


def test_nan_or_infinity_in_properties_is_rejected_not_stored(store, tmp_path):
    # Python's parser reads them, but they are not JSON: stored, they reached raw.users as such.
    path = tmp_path / "nan.csv"
    path.write_text(
        'id,properties\nu1,"{""score"": NaN}"\nu2,"{""score"": -Infinity}"\nu3,"{""score"": 1}"\n'
    )
    result = upload_csv(store, "vips", path, TYPES, rejects_file=tmp_path / "rejects.csv")
    assert (result.members_added, result.rejected) == (1, 2)
    assert [(r["row"], r["reason"]) for r in rejects(result)] == [
        ("1", "`properties` is not a JSON object"),
        ("2", "`properties` is not a JSON object"),
    ]
    assert patches(store) == {"u3": {"score": 1}}


def test_an_acknowledged_upload_keeps_its_place_before_a_later_identify(store, tmp_path):
    """The upload's members and events are committed with its rows as one queued batch; its
    identify patches follow. An identify that comes in between applies after them, as it came
    after them: the upload's patch first, then the identify's, in the profile and in the queue."""
    from audiences.static.uploads import prepare_upload, record_upload
    from audiences.store.profiles import get_profile, identify

    path = tmp_path / "plans.csv"
    path.write_text("id,plan,city\nu1,free,Lima\nu2,pro,\n", encoding="utf-8")
    upload = prepare_upload("vips", path, TYPES)
    with store.engine.begin() as connection:
        result = record_upload(store, connection, upload)
    assert (result.changed, upload.users_identified) == (2, 2)
    # Acknowledged: members and events are there, the patches wait as one batch.
    assert members(store) == {("u1", None), ("u2", None)}
    assert store.scalar(sa.text("select count(*) from membership_events")) == 2
    assert store.scalar(sa.text("select count(*) from upload_batches")) == 1
    assert store.scalar(sa.text("select count(*) from user_patches")) == 0
    with store.engine.begin() as connection:
        identify(store, connection, [("u1", {"plan": "enterprise"})])
    assert get_profile(store, "u1").properties == {"plan": "enterprise", "city": "Lima"}
    assert get_profile(store, "u2").properties == {"plan": "pro"}
    queued = store.rows(sa.text("select user_id, patch from user_patches order by patch_id"))
    assert [(row["user_id"], json.loads(row["patch"])) for row in queued] == [
        ("u1", {"plan": "free", "city": "Lima"}),
        ("u2", {"plan": "pro"}),
        ("u1", {"plan": "enterprise"}),
    ]
    assert store.scalar(sa.text("select count(*) from upload_batches")) == 0


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, tmp_path):
    """A fresh store on SQLite and on PostgreSQL (the session's `postgres_server`, when one can be
    had)."""
    from audiences.store.database import MembershipStore

    url = (
        f"sqlite:///{tmp_path}/store.sqlite"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_server").fresh_database()
    )
    opened = MembershipStore(url).create()
    yield opened
    opened.dispose()


def as_answered(store) -> tuple[int, int]:
    """The members written, and the uploads whose members wait, read without the store's own
    engines (which write those first): the store as the answer left it."""
    plain = sa.create_engine(store.url)
    try:
        with plain.connect() as connection:
            return (
                connection.execute(sa.text("select count(*) from audience_members")).scalar(),
                connection.execute(
                    sa.text("select count(*) from upload_batches where members is not null")
                ).scalar(),
            )
    finally:
        plain.dispose()


def test_an_upload_is_answered_once_journaled_and_every_read_and_write_comes_after_it(
    any_store, tmp_path
):
    """An upload is answered once its rows and members are journaled (one batch): its members
    and events are not written yet, but the first read writes them before it reads, and a write
    right after the answer (a remove of a member it added) comes after them. Then nothing is
    written twice, and the patches follow."""
    from audiences.static.uploads import prepare_upload, record_upload
    from audiences.store.members import Member, change_members, is_member
    from audiences.store.profiles import apply_uploads

    store = any_store
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    first.write_text("id,plan,tenant\nu1,free,\nu2,pro,acme\n u3,pro,\nu2,pro,acme\n")
    second.write_text("id,plan\nu3,free\nu1,\n")
    upload = prepare_upload("vips", first, TYPES, tenant_column="tenant")
    assert upload.quarantined.select("_row", "reason").rows() == [
        (3, "id has leading or trailing whitespace")
    ]
    with store.engine.begin() as connection:
        result = record_upload(store, connection, upload)
    assert (result.changed, result.unchanged) == (2, 0)
    assert as_answered(store) == (0, 1)
    # A read sees the upload: it has its members written first.
    assert is_member(store, "vips", "u2", "acme") and is_member(store, "vips", "u1")
    assert not is_member(store, "vips", "u2")
    assert as_answered(store) == (2, 0)

    with store.engine.begin() as connection:
        result = record_upload(store, connection, prepare_upload("vips", second, TYPES))
    assert (result.changed, result.unchanged) == (1, 1)
    assert as_answered(store) == (2, 1)
    # A write right after the answer comes after the upload: u3 is added, then removed.
    assert change_members(store, "vips", [Member("u3")], "remove").changed == 1
    assert members(store) == {("u1", None), ("u2", "acme")}
    apply_uploads(store)
    apply_uploads(store)
    events = store.rows(
        sa.text(
            "select user_id, tenant, event_type, entry_number, source from membership_events "
            "order by user_id, event_type"
        )
    )
    assert [tuple(row.values()) for row in events] == [
        ("u1", None, "entered", 1, "upload"),
        ("u2", "acme", "entered", 1, "upload"),
        ("u3", None, "entered", 1, "upload"),
        ("u3", None, "exited", 1, "static"),
    ]
    assert store.scalar(sa.text("select count(*) from upload_batches")) == 0
    assert patches(store) == {"u1": {"plan": "free"}, "u2": {"plan": "pro"}, "u3": {"plan": "free"}}


def test_a_cli_upload_killed_right_after_its_answer_loses_nothing_and_doubles_nothing(tmp_path):
    """`audiences upload`, killed (SIGKILL) right after it printed its answer, before it wrote the
    members, events and patches that follow: the next commands see every member and event once,
    and the rows rejected are named by their row number."""
    import os
    import signal
    import subprocess
    import sys

    from audiences.settings import FAULT_POINT
    from audiences.static.uploads import FAULT_AFTER_ANSWER
    from audiences.store.database import MembershipStore
    from audiences.store.members import create_static_audience

    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    store = MembershipStore(url).create()
    create_static_audience(store, "imported")
    path = tmp_path / "members.csv"
    bad = range(0, 3000, 300)
    path.write_text(
        "id,name\n" + "".join(f"{' ' if n in bad else ''}u{n},User {n}\n" for n in range(3000)),
        encoding="utf-8",
    )
    kept = {f"u{n}" for n in range(3000) if n not in bad}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")},
        "AUDIENCES_STORE_URL": url,
        "AUDIENCES_DUCKDB": str(tmp_path / "warehouse.duckdb"),
        "AUDIENCES_DEFINITIONS": str(tmp_path / "audiences"),
    }

    def cli(*arguments, **extra):
        return subprocess.run(
            [sys.executable, "-m", "audiences.cli", *arguments],
            capture_output=True,
            text=True,
            env={**env, **extra},
            cwd=tmp_path,
            timeout=120,
        )

    killed = cli("upload", "imported", str(path), **{FAULT_POINT: FAULT_AFTER_ANSWER})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "2,990 members added, 0 already members, 10 rejected" in killed.stdout
    with (tmp_path / "members.rejects.csv").open(encoding="utf-8") as handle:
        assert [row["row"] for row in csv.DictReader(handle)] == [str(n + 1) for n in bad]
    assert as_answered(store) == (0, 1)  # answered, and killed before anything followed
    listed = cli("members", "imported")
    assert listed.returncode == 0, listed.stderr
    assert sorted(json.loads(line)["user_id"] for line in listed.stdout.splitlines()) == sorted(
        kept
    )
    events = cli("events", "--audience", "imported", "--limit", "10000")
    assert events.returncode == 0, events.stderr
    assert sorted(
        (event["user_id"], event["event_type"])
        for event in map(json.loads, events.stdout.splitlines())
    ) == sorted((user_id, "entered") for user_id in kept)
    assert as_answered(store) == (len(kept), 0)
    store.dispose()
