"""A project's Dagster instance folder: made on first use, and brought up to date when its
`dagster.yaml` is an unedited copy of one the engine shipped earlier (`audiences init` copies it
into a project, and later versions add the fork-server launcher and the instance class, which a
project kept without them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from condition_harness import ROOT

from audiences.settings import prepare_dagster_home

CURRENT = (ROOT / "dagster_home" / "dagster.yaml").read_text(encoding="utf-8")
# The engine's earlier versions of the file, byte for byte (from its git history).
SHIPPED = sorted((Path(__file__).parents[1] / "data" / "dagster_home").glob("shipped-*.yaml"))


def test_a_new_folder_gets_the_engines_file(tmp_path):
    folder = prepare_dagster_home(tmp_path / "dagster_home")

    assert (folder / "dagster.yaml").read_text(encoding="utf-8") == CURRENT
    assert [p.name for p in folder.iterdir()] == ["dagster.yaml"]  # no temporary file left


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.stem)
def test_an_unedited_earlier_copy_is_brought_up_to_date(tmp_path, shipped):
    instance_file = tmp_path / "dagster.yaml"
    instance_file.write_bytes(shipped.read_bytes())

    prepare_dagster_home(tmp_path)

    assert instance_file.read_text(encoding="utf-8") == CURRENT
    assert "AudiencesInstance" in CURRENT and "ForkServerRunLauncher" in CURRENT
    assert [p.name for p in tmp_path.iterdir()] == ["dagster.yaml"]


def test_the_earlier_copies_are_all_there():
    # Three versions shipped before this one; a fourth appears when dagster.yaml changes again
    # (add the replaced file here and its sha256 to settings._SHIPPED_DAGSTER_YAML).
    assert len(SHIPPED) == 3
    assert all(p.read_text(encoding="utf-8") != CURRENT for p in SHIPPED)


@pytest.mark.parametrize(
    "edit",
    [
        lambda text: text + "\nrun_monitoring:\n  enabled: true\n",
        lambda text: text.replace("limit: 1", "limit: 2"),
    ],
    ids=["a setting added", "a setting changed"],
)
def test_an_edited_copy_is_left_to_its_owner(tmp_path, edit):
    instance_file = tmp_path / "dagster.yaml"
    edited = edit(SHIPPED[0].read_text(encoding="utf-8"))
    instance_file.write_text(edited, encoding="utf-8")

    prepare_dagster_home(tmp_path)

    assert instance_file.read_text(encoding="utf-8") == edited


def test_the_current_file_is_not_rewritten(tmp_path):
    instance_file = tmp_path / "dagster.yaml"
    instance_file.write_text(CURRENT, encoding="utf-8")
    before = instance_file.stat().st_mtime_ns
    inode = instance_file.stat().st_ino

    prepare_dagster_home(tmp_path)

    assert instance_file.stat().st_ino == inode
    assert instance_file.stat().st_mtime_ns == before
