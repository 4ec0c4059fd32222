"""The Dagster code location of the audiences engine. Domain logic lives in `audiences/`."""


def build_definitions(environments: list[str] | None = None):
    """Every environment's definitions (`pipelines/defs/environments.py`), reading `AUDIENCES_*`
    settings now; `environments` limits them to those (`audiences run` loads only its own)."""
    from pipelines.defs.environments import definitions

    return definitions(environments)
