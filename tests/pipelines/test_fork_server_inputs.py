"""What tells a fork server that its load is out of date (`LoadInputs`): the files the load read,
the folders it scanned and the modules it imported, but not the folders the import system listed
(the working folder, where runs write their warehouse's lock and WAL)."""

from __future__ import annotations

import importlib
import sys
import time

from pipelines.fork_server import LoadInputs


def test_a_load_is_stale_when_what_it_read_changes_not_when_runs_write_beside_it(
    tmp_path, monkeypatch
):
    code = tmp_path / "code"
    code.mkdir()
    (code / "fork_server_probe.py").write_text("VALUE = 1\n")
    definitions = tmp_path / "definitions"
    (definitions / "first").mkdir(parents=True)
    (definitions / "first" / "audience.json").write_text("{}")
    monkeypatch.syspath_prepend(str(code))
    inputs = LoadInputs()
    with inputs.recording():
        importlib.import_module("fork_server_probe")
        for path in sorted(definitions.rglob("*.json")):
            path.read_bytes()
    try:
        assert inputs.changed() == []
        # A run writes and removes files in the folder on sys.path (a warehouse's lock).
        (code / "warehouse.duckdb.run-lock").write_text("")
        (code / "warehouse.duckdb.run-lock").unlink()
        assert inputs.changed() == []
        # A definition added: its folder was scanned.
        time.sleep(0.01)
        (definitions / "second").mkdir()
        assert inputs.changed() == [str(definitions)]
        # A module's source changed.
        (code / "fork_server_probe.py").write_text("VALUE = 22\n")
        assert str(code / "fork_server_probe.py") in inputs.changed()
    finally:
        sys.modules.pop("fork_server_probe", None)
