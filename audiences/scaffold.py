"""`audiences init`: a project folder of one's own, so that nothing a user does writes into the engine.

A project folder has the layout every setting defaults to (`audiences/settings.py`), relative to
the working folder: definitions in `data/audiences/`, users in `data/sources.yml`, triggers in
`data/workflows/`, sinks in `data/sinks.yml`, the warehouse and the store under `data/`, a dbt
project in `dbt_project/` and Dagster's instance in `dagster_home/`. The dbt project is the
engine's without the sample's audiences (`dbt_project.scaffold_dbt_project`), its models generated
from the folder's definitions. Files that already exist are kept, so `init` also turns a folder
that already holds definitions (say, from `knock audience pull` into `data/audiences`) into a
project.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from audiences.conditions.definitions import DEFINITION_FILE
from audiences.dbt.project import generate, scaffold_dbt_project
from audiences.settings import PROJECT_ROOT, Settings

# An example to start from, written only into a folder without definitions: one audience, the
# users it is evaluated on, and a workflow trigger on it.
EXAMPLE_AUDIENCE = "pro-users"
EXAMPLE_DEFINITION = {
    "name": "Pro users",
    "type": "dynamic",
    "description": "Users on the pro plan. An example: replace it with your own definitions.",
    "segments": [
        {"conditions": [{"property": "recipient.plan", "operator": "equal_to", "argument": "pro"}]}
    ],
}
EXAMPLE_USERS = """\
id,name,email,plan,signed_up_at,address.country
user_1,Ada Lovelace,ada@example.com,pro,2026-10-01T09:00:00Z,GB
user_2,Grace Hopper,grace@example.com,free,2026-10-12T15:30:00Z,US
user_3,Katherine Johnson,katherine@example.com,pro,2026-10-20T08:15:00Z,US
"""
EXAMPLE_SOURCES = """\
# User sources, loaded in this order into the warehouse's user store (raw.users).
#   path:   a file or folder, relative to this file (or a database for duckdb / sqlite)
#   format: csv | parquet | jsonl | duckdb | sqlite (guessed from the extension when omitted)
#   mode:   snapshot (the source holds every user; users it no longer holds are deleted)
#           or stream (identify-style updates: upserts only)
sources:
  - name: users
    path: users.csv
    mode: snapshot
# Event sources (what users did) for event conditions (`performed`, ...): JSON lines of Segment
# track calls, Parquet, or a duckdb table/query; `columns` maps message_id, user_id, event,
# timestamp and properties to the source's names (docs/conditions.md, "Event conditions").
# events:
#   - name: segment_tracks
#     path: events/
#     format: jsonl
"""
SOURCES_TEMPLATE = EXAMPLE_SOURCES.replace(
    """sources:
  - name: users
    path: users.csv
    mode: snapshot
""",
    """# sources:
#   - name: users
#     path: users.csv
#     mode: snapshot
sources: []
""",
)
EXAMPLE_TRIGGER = {
    "audience": EXAMPLE_AUDIENCE,
    "on": "entered",
    "trigger_frequency": "once_per_recipient",
    "data": {"campaign": "pro-welcome"},
}
WORKSPACE = """\
# `DAGSTER_HOME=$PWD/dagster_home dagster dev` in this folder: the engine's code location.
load_from:
  - python_module:
      module_name: pipelines.definitions
      location_name: audiences
"""
GITIGNORE = """\
/data/*.duckdb
/data/*.duckdb.wal
/data/store.sqlite*
/data/*/store.sqlite*
/data/api-rate-limits.bin
/data/out/
/dbt_project/target/
/dbt_project/logs/
/dbt_project/dbt_packages/
/dagster_home/*
!/dagster_home/dagster.yaml
"""


@dataclass
class InitReport:
    folder: Path
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    generated: list[Path] = field(default_factory=list)


def _record_definitions(folder: Path, definitions_dir: Path, report: InitReport) -> None:
    """Name the definitions folder in the project's `.env` (`AUDIENCES_DEFINITIONS`, relative to
    the project when inside it), unless `.env` already names one."""
    from dotenv import dotenv_values

    path = folder / ".env"
    if path.is_file() and dotenv_values(path).get("AUDIENCES_DEFINITIONS"):
        report.kept.append(path)
        return
    target = definitions_dir.resolve()
    value = target.relative_to(folder) if folder in target.parents else target
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    path.write_text(
        f"{existing}# The definitions folder `audiences init --definitions` was given.\n"
        f"AUDIENCES_DEFINITIONS={json.dumps(str(value))}\n",
        encoding="utf-8",
    )
    report.created.append(path)


def init_project(folder: Path, definitions_dir: Path | None = None) -> InitReport:
    """Scaffold a project folder at `folder` (see the module docstring), keeping what exists, and
    generate its dbt models from its definitions: `definitions_dir` when given (then no example is
    written, and the workflows folder and sinks file go beside it, where the settings look for
    them), else `data/audiences`."""
    folder = folder.expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    data = folder / "data"
    # The paths every command run from `folder` uses, from the one place that decides them.
    settings = Settings.from_env(
        {},
        duckdb_path=data / "warehouse.duckdb",
        definitions_dir=definitions_dir or data / "audiences",
        sources_file=data / "sources.yml",
        dbt_project_dir=folder / "dbt_project",
    )
    report = InitReport(folder)

    def write(path: Path, text: str) -> None:
        if path.exists():
            report.kept.append(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        report.created.append(path)

    example = definitions_dir is None and not any(
        settings.definitions_dir.glob(f"*/{DEFINITION_FILE}")
    )
    if example:
        write(
            settings.definitions_dir / EXAMPLE_AUDIENCE / DEFINITION_FILE,
            json.dumps(EXAMPLE_DEFINITION, indent=2) + "\n",
        )
        write(
            settings.workflows_dir / "welcome-pro-users" / "trigger.json",
            json.dumps(EXAMPLE_TRIGGER, indent=2) + "\n",
        )
        if not settings.sources_file.exists():
            write(data / "users.csv", EXAMPLE_USERS)
    write(settings.sources_file, EXAMPLE_SOURCES if example else SOURCES_TEMPLATE)
    write(settings.sinks_file, (PROJECT_ROOT / "data" / "sinks.yml").read_text(encoding="utf-8"))
    settings.workflows_dir.mkdir(parents=True, exist_ok=True)
    write(
        folder / "dagster_home" / "dagster.yaml",
        (PROJECT_ROOT / "dagster_home" / "dagster.yaml").read_text(encoding="utf-8"),
    )
    write(folder / "workspace.yaml", WORKSPACE)
    if definitions_dir is not None:
        # The Dagster UI (`dagster dev` here) is given no flags: without this, its code location
        # looked for `data/audiences` and failed to load. Commands run here read `.env` too.
        _record_definitions(folder, settings.definitions_dir, report)
    write(folder / ".gitignore", GITIGNORE)
    if settings.dbt_project_dir.exists():
        report.kept.append(settings.dbt_project_dir)
    else:
        report.created += scaffold_dbt_project(settings.dbt_project_dir)
    report.generated = generate(settings)
    return report
