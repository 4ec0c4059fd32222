"""Everything a project keeps on disk, for tests that check a refused command changed nothing:
every row of every table of its stores and every definition file."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def project_state(folder: Path, stores: str = "store.sqlite") -> dict:
    """Every row of every table of every SQLite file under `folder` named like `stores` (a glob),
    and every `audience.json`, keyed by their paths relative to `folder`."""
    found = {}
    for database in sorted(folder.rglob(stores)):
        with sqlite3.connect(database) as connection:
            tables = [
                row[0]
                for row in connection.execute(
                    "select name from sqlite_master where type = 'table' order by name"
                )
            ]
            for table in tables:
                found[f"{database.relative_to(folder)}:{table}"] = sorted(
                    map(repr, connection.execute(f'select * from "{table}"'))
                )
    for path in sorted(folder.rglob("audience.json")):
        found[str(path.relative_to(folder))] = path.read_text()
    return found
