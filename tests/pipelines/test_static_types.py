"""The static audiences' assets read every audience's type without compiling the definitions."""

from __future__ import annotations

import shutil

from condition_harness import ROOT, counted_compilations

from audiences.dbt.project import generate
from audiences.settings import Settings
from audiences.store.database import MembershipStore
from pipelines.defs.static import types


def test_static_uploads_read_the_audience_types_without_compiling(
    tmp_path, monkeypatch, dbt_project_copy
):
    """Issue 25: each upload, sync and copy of static members read the definitions folder with
    `load_definition_set`, compiling every condition of every audience (seconds at 2,000) to
    learn which audiences are static. It reads the folder as a run does: the files `generate`
    compiled are not compiled again; a broken one still is, and is not a known audience."""
    project = shutil.copytree(dbt_project_copy, tmp_path / "dbt_project")
    definitions = shutil.copytree(ROOT / "data" / "audiences", tmp_path / "audiences")
    broken = definitions / "seats-misspelled" / "audience.json"
    broken.parent.mkdir()
    broken.write_text(
        '{"name": "Seats", "type": "dynamic", "segments": [{"conditions": [{"property": '
        '"recipient.seats", "operator": "greater_than", "argument": "many"}]}]}'
    )
    settings = Settings.from_env({}, dbt_project_dir=project, definitions_dir=definitions)
    generate(settings)
    store = MembershipStore(f"sqlite:///{tmp_path / 'store.sqlite'}").create()
    compiled = counted_compilations(monkeypatch)
    found = types(settings, store)
    assert compiled == ["$.segments[0].conditions[0]"]  # the broken one's only condition
    assert found["vip-customers"] == "static"
    assert found["eu-customers"] == "dynamic"
    assert "seats-misspelled" not in found
