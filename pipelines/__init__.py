"""The Dagster code location of the audiences engine. Domain logic lives in `audiences/`."""

from pathlib import Path


def build_definitions():
    """Load every definition under `pipelines/defs/`, reading `AUDIENCES_*` settings now."""
    import dagster as dg

    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent / "defs")
