"""Every environment in one code location: each gets its own copy of the asset graph, checks,
jobs, schedule and sensors, named by `EnvironmentNames` (the first environment's as they always
were, a later one's under its name: `production/users`, `production__audiences_job`), and the
resources pick the run's environment (`environment_resources`), so every copy writes only its
own environment's warehouse, store and dbt project, the ones `--environment` gives the CLI.

Why copies and not a partition per environment: each environment evaluates its own definitions,
so its dbt project and manifest, and so its audience assets, differ (an audience in development
that is not promoted has no production asset); a partitioned asset would show one environment's
audiences for all. What loading costs per environment is what it cannot share: reading its
definitions, checking its models and manifest (`prepare`, which parses only when its project
changed) and the assets of its manifest.
"""

from __future__ import annotations

import dagster as dg

from audiences.settings import Settings
from pipelines.defs.audiences import (
    audience_definitions,
    audience_models,
    every_audience_built,
    every_definition_is_usable,
)
from pipelines.defs.events import events_definitions
from pipelines.defs.membership import (
    membership_changes,
    no_mass_membership_change,
    published_membership_events,
    workflow_trigger_deliveries,
)
from pipelines.defs.resources import EnvironmentNames, environment_resources
from pipelines.defs.schedules import environment_jobs
from pipelines.defs.sensors import environment_sensors
from pipelines.defs.spark import SPARK_ASSETS, spark_job, spark_schedule
from pipelines.defs.static import (
    static_audience_members,
    static_audience_syncs,
    static_audience_uploads,
    static_member_job,
)
from pipelines.defs.users import users_definitions

# The assets and checks every environment has, whatever its settings declare.
ASSETS = (
    audience_definitions,
    static_audience_uploads,
    static_audience_syncs,
    static_audience_members,
    membership_changes,
    published_membership_events,
    workflow_trigger_deliveries,
)
CHECKS = (every_definition_is_usable, every_audience_built, no_mass_membership_change)


def served_settings(environments: list[str] | None = None) -> dict[str, Settings]:
    """The settings of each environment the code location serves: every configured one
    (AUDIENCES_ENVIRONMENTS, in order), or only `environments` (`audiences run` loads the one it
    runs)."""
    base = Settings.from_env()
    return {name: base.for_environment(name) for name in environments or base.environments}


def in_environment(definition, names: EnvironmentNames, keys: dict[dg.AssetKey, dg.AssetKey]):
    """An asset, external asset or check of the first environment's graph, renamed for another
    environment: its keys, dependencies, group and op carry the environment's name."""
    if not names.prefix:
        return definition
    if isinstance(definition, dg.AssetSpec):
        return definition.replace_attributes(
            key=names.prefixed(definition.key),
            group_name=names.group(definition.group_name) if definition.group_name else None,
            deps=[names.prefixed(dep.asset_key) for dep in definition.deps],
        )
    renamed = definition.with_attributes(asset_key_replacements=keys)
    if renamed.specs:
        renamed = renamed.map_asset_specs(
            lambda spec: spec.replace_attributes(group_name=names.group(spec.group_name))
        )
    # Ops are named once per code location: a later environment's carry its name.
    op = renamed.op
    if isinstance(definition, dg.AssetChecksDefinition):
        attributes = renamed.get_attributes_dict()
        return dg.AssetChecksDefinition.create(
            keys_by_input_name=attributes["keys_by_input_name"],
            node_def=op.with_replaced_properties(name=names.name(op.name)),
            check_specs_by_output_name=attributes["check_specs_by_output_name"],
            can_subset=attributes["can_subset"],
            resource_defs=attributes["resource_defs"],
        )
    return renamed.__class__.dagster_internal_init(
        **{
            **renamed.get_attributes_dict(),
            "node_def": op.with_replaced_properties(name=names.name(op.name)),
        }
    )


def referenced_keys(definitions) -> set[dg.AssetKey]:
    """Every asset key the definitions name: their own, their dependencies', their checks'."""
    found: set[dg.AssetKey] = set()
    for definition in definitions:
        if isinstance(definition, dg.AssetSpec):
            continue
        found |= set(definition.keys)
        found |= {dep.asset_key for spec in definition.specs for dep in spec.deps}
        found |= {check.asset_key for check in definition.check_keys}
    return found


def unavailable(settings: Settings) -> str | None:
    """Why a later environment cannot be served yet (nothing promoted to it), or None."""
    if settings.environment == settings.development_environment:
        return None
    if not (settings.definitions_dir.is_dir() and settings.dbt_project_dir.is_dir()):
        return (
            f"{settings.environment} has no promoted definitions yet: commit in "
            f"{settings.development_environment} (`audiences commit -m ...`), then "
            f"`audiences promote --to {settings.environment}`, and reload the code location"
        )
    return None


def environment_definitions(settings: Settings):
    """One environment's assets, checks, jobs, schedules and sensors, and the definitions it
    evaluates (None when it cannot be served yet: then a single asset says why)."""
    names = EnvironmentNames.of(settings)
    # AUDIENCES_ENGINE=spark: the Spark assets and their job too (pipelines/defs/spark.py).
    spark = SPARK_ASSETS if settings.engine == "spark" else ()
    reason = unavailable(settings)
    if reason is None:
        try:
            models, definition_set = audience_models(settings)
        except Exception as error:
            if not names.prefix:
                raise  # the first environment's problems stop the code location, as they always did
            reason = f"{settings.environment} cannot be loaded: {error}"
    if reason is not None:
        dg.get_dagster_logger().warning(reason)
        placeholder = dg.AssetSpec(
            names.key("audience_definitions"),
            description=reason,
            group_name=names.group("audiences"),
            metadata={"environment": settings.environment},
        )
        return dg.Definitions(assets=[placeholder]), None
    users = users_definitions(settings)
    events = events_definitions(settings)
    templates = [*users.assets, *events.assets, *ASSETS, *spark]
    checks = [*users.asset_checks, *CHECKS]
    keys = {key: names.prefixed(key) for key in referenced_keys([*templates, *checks])}
    assets = [in_environment(each, names, keys) for each in templates] + [models]
    executable = [
        key
        for each in assets
        if isinstance(each, dg.AssetsDefinition) and each.is_executable
        for key in each.keys
    ]
    spark_keys = {names.prefixed(key) for each in spark for key in each.keys}
    executable = [key for key in executable if key not in spark_keys]
    selection = dg.AssetSelection.assets(*executable)
    deliveries = dg.AssetSelection.assets(names.key("workflow_trigger_deliveries"))
    main, reevaluate, deliver, schedule = environment_jobs(
        names, selection | dg.AssetSelection.checks_for_assets(*executable), deliveries
    )
    spark_jobs = (
        [spark_job(names, dg.AssetSelection.assets(*spark_keys) | deliveries)] if spark else []
    )
    # With Spark, its schedule re-evaluates instead of DuckDB's (pipelines/defs/spark.py).
    schedules = [spark_schedule(names, spark_jobs[0])] if spark else [schedule]
    return (
        dg.Definitions(
            assets=assets,
            asset_checks=[in_environment(each, names, keys) for each in checks],
            jobs=[main, reevaluate, deliver, static_member_job(names), *spark_jobs],
            schedules=schedules,
            sensors=environment_sensors(settings, names),
        ),
        definition_set,
    )


def definitions(environments: list[str] | None = None) -> dg.Definitions:
    """The code location: every served environment's definitions, and resources that give each
    run its environment's settings, warehouse, store, dbt project and definitions."""
    from pipelines.defs.lifecycle import promotion_job, promotion_resources

    served = served_settings(environments)
    parts, definition_sets = [], {}
    for name, settings in served.items():
        part, definition_set = environment_definitions(settings)
        parts.append(part)
        if definition_set is not None:
            definition_sets[name] = definition_set
    first = next(iter(served.values()))
    jobs = [promotion_job] if len(first.environments) > 1 else []
    resources = environment_resources(served, definition_sets)
    return dg.Definitions.merge(
        *parts,
        dg.Definitions(
            jobs=jobs,
            resources={**resources, **(promotion_resources() if jobs else {})},
            # Assets materialized from the UI's graph, outside the jobs, run their steps one after
            # another in the run's process too: in parallel processes they would take turns at
            # the warehouse's writer lock, and another run could write between their steps.
            executor=dg.in_process_executor,
        ),
    )
