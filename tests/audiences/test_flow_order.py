"""The packages read as the data flow: a stage imports only itself and the stages before it.

users → conditions → dbt → warehouse → membership → store → workflows → delivery. Every import
counts, also those inside functions. Beside the flow: `settings` (imported by any stage),
`identifiers` (the rules for user and tenant ids, a leaf the loader, the store, the API and the CLI
read alike) and `warehouse.schema` (the raw tables' DDL, a leaf every stage that writes DuckDB may
import); static,
api and cli sit beside it and may import any stage, but no stage imports them. (Static
membership changes and the one tenant-strict check, `store.members`, write only the store: the
store writes an answered upload's members before any read.)
"""

from __future__ import annotations

import ast
from pathlib import Path

from condition_harness import ROOT

FLOW = ["users", "conditions", "dbt", "warehouse", "membership", "store", "workflows", "delivery"]
ANYWHERE = {"audiences.settings", "audiences.identifiers", "audiences.warehouse.schema"}
# (importing module, imported module): beside-the-flow imports kept on purpose.
ALLOWED: set[tuple[str, str]] = set()


def imports(path: Path) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return [(name, line) for name, line in found if name.split(".")[0] == "audiences"]


def test_no_stage_imports_a_later_stage_or_a_package_beside_the_flow():
    package = ROOT / "audiences"
    upward = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if len(parts) < 2 or parts[0] not in FLOW:
            continue
        module = ".".join(("audiences", *parts))
        stage = FLOW.index(parts[0])
        for name, line in imports(path):
            target = name.split(".")[1] if "." in name else ""
            if name in ANYWHERE or (module, name) in ALLOWED or target == parts[0]:
                continue
            if target not in FLOW or FLOW.index(target) > stage:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert upward == []


def test_the_shared_schema_module_imports_nothing_of_the_engine():
    """Only a leaf may be imported from anywhere, or it would carry its imports upward."""
    assert imports(ROOT / "audiences" / "warehouse" / "schema.py") == []
    assert [name for name, _ in imports(ROOT / "audiences" / "settings.py")] == []
    assert imports(ROOT / "audiences" / "identifiers.py") == []
