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
