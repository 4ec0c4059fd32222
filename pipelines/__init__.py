"""The Dagster code location of the audiences engine. Domain logic lives in `audiences/`."""


def build_definitions(environments: list[str] | None = None):
    """Every environment's definitions (`pipelines/defs/environments.py`), reading `AUDIENCES_*`
    settings now; `environments` limits them to those (`audiences run` loads only its own)."""
    from pipelines.defs.dagster_storage import reuse_sqlite_connections
    from pipelines.defs.environments import definitions

    reuse_sqlite_connections()  # Dagster's SQLite history: a connection per file, not per event

    return definitions(environments)
