"""Setting up a project and keeping its definitions and generated dbt models in order: `init`, `validate`, `generate`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from audiences.settings import Settings


def init(settings: Settings, arguments) -> int:
    """Make FOLDER a project of your own, with the layout every setting defaults to: definitions in
    data/audiences/ (an example when there are none), users in data/sources.yml, workflow triggers
    in data/workflows/, sinks in data/sinks.yml, the dbt project in dbt_project/ (the engine's,
    without its sample audiences, its models generated from your definitions) and Dagster's
    instance in dagster_home/. Files that exist are kept. With --definitions, the models are
    generated from that folder instead, and no example is written. Run every other command from
    FOLDER: nothing it does writes into the engine."""
    from audiences.scaffold import init_project

    definitions = settings.definitions_dir if arguments.definitions else None
    report = init_project(Path(arguments.folder), definitions)
    folder = report.folder
    print(
        f"{folder}: {len(report.created)} files created, {len(report.kept)} kept, "
        f"{len(report.generated)} dbt model files generated from {definitions or folder / 'data' / 'audiences'}"
    )
    for path in report.kept:
        print(f"  kept {os.path.relpath(path, folder)}")
    flag = f" --definitions {arguments.definitions}" if arguments.definitions else ""
    print(
        f"next: cd {folder} && audiences{flag} run     (the Dagster UI: DAGSTER_HOME=$PWD/dagster_home dagster dev)"
    )
    return 0


def validate(settings: Settings, arguments) -> int:
    """Validate every definition in the definitions folder: keys, operators, arguments (including
    relative times under 15 minutes), audience references and cycles, and, when a warehouse exists,
    that no audience changed type. Each problem names the file and the JSON path. With
    --knock-compatible, conditions Knock cannot hold (event conditions) are problems too."""
    from audiences.cli.common import read_warehouse
    from audiences.conditions.definitions import (
        DefinitionError,
        load_definition_set,
        validate_definitions,
    )
    from audiences.dbt.models import custom_audience_keys
    from audiences.warehouse.evaluation import registered_types
    from audiences.warehouse.queries import WarehouseError

    # Every problem at once: a broken file does not hide another file's unknown reference.
    found = load_definition_set(
        settings.definitions_dir, custom_audience_keys(settings.dbt_project_dir)
    )
    definitions = found.definitions
    existing: dict[str, str] = {}
    if settings.duckdb_path.exists():
        try:
            with read_warehouse(settings) as connection:
                existing = registered_types(connection)
        except WarehouseError as error:
            print(f"warning: type changes not checked: {error}", file=sys.stderr)
    problems = found.problems + validate_definitions(
        definitions, custom_audience_keys(settings.dbt_project_dir), existing
    )
    if getattr(arguments, "knock_compatible", False):
        from audiences.conditions.definitions import knock_incompatibilities

        # Valid here, but Knock cannot hold them: not pushable with `knock audience push`.
        for key in sorted(definitions):
            problems += knock_incompatibilities(definitions[key])
    if getattr(arguments, "target", "duckdb") == "spark":
        from audiences.dbt.spark import spark_problems

        problems += spark_problems(definitions)
    if problems:
        raise DefinitionError(problems)
    from audiences.delivery.setup import load_workflow_setup

    setup = load_workflow_setup(settings)
    kinds = {
        kind: sum(d.type == kind for d in definitions.values()) for kind in ("dynamic", "static")
    }
    print(
        f"{len(definitions)} definitions are valid ({kinds['dynamic']} dynamic, {kinds['static']} static) "
        f"in {settings.definitions_dir}; {len(setup.triggers)} workflow triggers, sinks: "
        f"{', '.join(sorted(setup.sinks))} (default {setup.default_sink})"
    )
    return 0


def generate(settings: Settings, arguments) -> int:
    """Regenerate the dbt models under dbt_project/ from the audience definitions. With --check,
    change nothing and fail if the files on disk differ from what the definitions generate. An
    audience whose definition has errors gets no model (its last members are kept); the others
    are generated, and the errors are listed (exit code 1)."""
    from audiences.conditions.definitions import load_definitions
    from audiences.dbt.models import drift, generate_models
    from audiences.dbt.project import generate as write_generated
    from audiences.settings import require_dbt_project

    if getattr(arguments, "target", "duckdb") == "spark":
        from audiences.dbt.spark import generate_spark

        return generate_spark(settings, check=arguments.check)
    if arguments.check:
        require_dbt_project(settings.dbt_project_dir)
        files = generate_models(
            load_definitions(settings.definitions_dir),
            settings.dbt_project_dir,
            source_label=settings.definitions_dir.name,
        )
        problems = drift(files, settings.dbt_project_dir)
        for problem in problems:
            print(problem)
        if problems:
            print(
                "error: generated models are out of date; run `audiences generate`", file=sys.stderr
            )
            return 1
        print(f"{len(files)} generated files are up to date")
        return 0
    from audiences.conditions.definitions import DefinitionError
    from audiences.dbt.project import project_definitions

    found = project_definitions(settings)
    changed = write_generated(settings, found)
    print(f"{len(changed)} files changed" + "".join(f"\n  {path}" for path in changed))
    if found.skipped:  # generated without them (their members are kept); say why
        raise DefinitionError(found.reasons)
    return 0


def register(command) -> None:
    """Add this group's commands to the parser (`command` makes one subcommand)."""
    sub = command(
        "init",
        init,
        "make a project folder: definitions, sources, sinks, a dbt project, dagster_home",
    )
    sub.add_argument(
        "folder", nargs="?", default=".", help="the folder (default: the working folder)"
    )
    sub = command("validate", validate, "validate every audience definition")
    sub.add_argument(
        "--target",
        choices=("duckdb", "spark"),
        default="duckdb",
        help="also reject what the target cannot evaluate yet (spark: event conditions, static audiences)",
    )
    sub.add_argument(
        "--knock-compatible",
        action="store_true",
        help="also reject what Knock cannot hold (event conditions), naming each condition",
    )
    sub = command("generate", generate, "regenerate the dbt models from the definitions")
    sub.add_argument(
        "--check", action="store_true", help="fail if the committed models are out of date"
    )
    sub.add_argument(
        "--target",
        choices=("duckdb", "spark"),
        default="duckdb",
        help="the warehouse to generate for: duckdb (dbt_project/, default) or spark (dbt_spark/)",
    )
