"""Audiences: the definitions asset and the dbt models that materialize every audience."""

import json
from collections.abc import Mapping
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliResource,
    dbt_assets,
)
from dagster_dbt.asset_utils import (
    DAGSTER_DBT_UNIQUE_ID_METADATA_KEY,
    get_checks_on_sources_upstream_of_selected_assets,
    get_dbt_test_names_for_check_keys,
    get_manifest_and_translator_from_dbt_assets,
)
from pydantic import Field

from audiences.conditions.definitions import (
    DefinitionError,
    DefinitionSet,
    model_name_for,
    validate_definitions,
)
from audiences.dbt.models import custom_audience_keys
from audiences.dbt.project import (
    build_state,
    keep_build_state,
    prepare,
    project_definitions,
    project_fingerprint,
)
from audiences.delivery.setup import load_workflow_setup
from audiences.lifecycle.commits import version_metadata
from audiences.membership.changes import pending_changes
from audiences.settings import Settings, format_time
from audiences.warehouse.evaluation import (
    EarlierEvaluationError,
    check_evaluation_time,
    evaluation_time_for,
    last_full_build,
    members_evaluated_at,
    record_full_build,
    record_registry,
    registered_types,
    set_evaluation_clock,
)
from pipelines.defs.dagster_scale import cache_asset_and_check_keys
from pipelines.defs.dagster_storage import stored_together
from pipelines.defs.resources import EnvironmentNames, SettingsParam, WarehouseResource

# The definitions the code location loaded with, which its models were generated from.
DefinitionSetParam = dg.ResourceParam[DefinitionSet]

DEFINITIONS_KEY = dg.AssetKey("audience_definitions")
# What a re-evaluation builds when the dbt project has not changed since the last full build, and
# what it leaves alone (views and tables that only change with the definitions).
REEVALUATED_MODELS = (
    "int_users_flattened",
    "int_users_to_reevaluate",
    "audience_members",
    "audience_evaluations",
)
# The uniqueness test of int_users_flattened's keys (a 10M-row aggregate, 1.2 s) is left to full
# builds: every load checks that user ids are unique (`users_have_unique_ids`), the loader gives each
# new user the next key, and the model replaces rows by delete+insert on that key.
UNCHANGED_WHEN_DEFINITIONS_ARE = (
    "tag:audience",
    "stg_warehouse__users",
    "audience_catalog",
    "source:warehouse",
    "unique_int_users_flattened_user_key",
)
# dbt's per-command costs that grow with the number of nodes, left out of a re-evaluation: the
# JSON artifacts (manifest, graph, run_results) and listing the relations of the schemas it does
# not build (the audience views).
LEAN_FLAGS = ("--no-write-json", "--cache-selected-only")
# dbt's historical way of ordering a build's tests before their models' dependents walks every
# ancestor's children for every node: audience_members has one ancestor per audience, and at
# 2,000 it took ~4 s of a warm build's 22 s of CPU. The fast way orders them the same (dbt: "the
# same transitive reduction"), in time linear in the graph.
GRAPH_FLAGS = ("--use-fast-test-edges",)
GROUPS = {
    "staging": "staging",
    "intermediate": "staging",
    "audiences": "audiences",
    "marts": "audiences_marts",
}
# A run over some of the dbt assets names at most this many audience views to dbt one by one; past
# it, and when it selects all of them, it selects them by their tag. dbt resolves each selector
# over every node, so one selector per audience (what dagster-dbt hands dbt for a subset) costs
# N^2: 2,009 selectors took 998 s at 2,000 audiences (bench/analysis.md).
LISTED_AUDIENCE_VIEWS = 20
# The asset check that fails while some definitions have errors; `audiences run` reads it too.
DEFINITIONS_CHECK = "every_definition_is_usable"


class EvaluationConfig(dg.Config):
    """Run settings: an explicit evaluation time makes a run reproducible."""

    evaluation_time: str | None = Field(
        default=None,
        description=("ISO 8601 evaluation time (default: AUDIENCES_EVALUATION_TIME, else now)"),
    )
    allow_earlier: bool = Field(
        default=False,
        description=(
            "evaluate at a time earlier than the last recorded evaluation; such a run records the members "
            "and their counts, and no membership events or workflow triggers"
        ),
    )


class AudiencesTranslator(DagsterDbtTranslator):
    """Audience models are keyed `audiences/<model>` and depend on the definitions they come from;
    a later environment's keys and groups carry its name (`EnvironmentNames`): dagster-dbt maps
    the run's selected keys to dbt models through this translator, so the prefix lives here."""

    names = EnvironmentNames()

    def get_asset_spec(self, manifest: Mapping[str, Any], unique_id: str, project) -> dg.AssetSpec:
        # Once per node, as dagster-dbt's own method: it resolves each node's dependencies through
        # this method, so without it an audience's spec was made again for every model that reads
        # it (audience_members reads every audience, at load and when a run maps dbt's events).
        made = self.__dict__.setdefault("_made_specs", {})
        memo = (id(manifest), unique_id, id(project))
        if memo not in made:
            made[memo] = self._prefixed_spec(manifest, unique_id, project)
        return made[memo]

    def _prefixed_spec(self, manifest: Mapping[str, Any], unique_id: str, project) -> dg.AssetSpec:
        spec = self._unprefixed_spec(manifest, unique_id, project)
        if not self.names.prefix:
            return spec
        # Dependencies were resolved through this method, so they carry the prefix already.
        return spec.replace_attributes(
            key=self.names.prefixed(spec.key),
            group_name=self.names.group(spec.group_name) if spec.group_name else None,
        )

    def _unprefixed_spec(self, manifest: Mapping[str, Any], unique_id: str, project):
        spec = super().get_asset_spec(manifest, unique_id, project)
        node = (
            manifest.get("nodes", {}).get(unique_id)
            or manifest.get("sources", {}).get(unique_id)
            or {}
        )
        folder = (node.get("fqn") or ["", ""])[1] if node.get("resource_type") == "model" else None
        if folder == "audiences":
            spec = spec.replace_attributes(key=dg.AssetKey(["audiences", node["name"]]))
            spec = spec.merge_attributes(deps=[self.names.prefixed(DEFINITIONS_KEY)])
            # Which path the audience takes: real time on identify, or the next run (issue 19).
            path = getattr(self, "evaluation_paths", {}).get(node["name"])
            if path is not None:
                spec = spec.replace_attributes(
                    description=f"{spec.description or ''}\n\nEvaluation path: {path}".strip()
                ).merge_attributes(metadata={"evaluation_path": path})
        if folder in GROUPS:
            spec = spec.replace_attributes(group_name=GROUPS[folder])
        return spec


@dg.asset(
    key=DEFINITIONS_KEY,
    group_name="audiences",
    kinds={"json"},
    description=(
        "The audience definitions (Knock CLI layout, `<folder>/<key>/audience.json`), validated: "
        "keys, operators, arguments, audience references and cycles, and type immutability "
        "against the audiences the warehouse already knows. An audience whose definition has "
        "errors, and any audience that refers to it, is skipped: not evaluated, its last members "
        f"and their memberships kept as they were (the `{DEFINITIONS_CHECK}` check fails)."
    ),
)
def audience_definitions(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    settings: SettingsParam,
    definition_set: DefinitionSetParam,
) -> dg.MaterializeResult:
    definitions = definition_set.definitions
    with warehouse.connect() as connection:
        problems = validate_definitions(
            definitions,
            custom_audience_keys(settings.dbt_project_dir),
            registered_types(connection),
        )
        if problems:
            raise dg.Failure("invalid audience definitions:\n" + "\n".join(map(str, problems)))
        record_registry(connection, definitions)
    if definition_set.skipped:  # the details are the check's (every_definition_is_usable)
        context.log.warning(
            f"skipped {len(definition_set.skipped)} audiences whose definitions have errors "
            f"(their last members are kept): {', '.join(definition_set.skipped)}; "
            f"see the {DEFINITIONS_CHECK} check"
        )
    # A broken trigger file does not stop the evaluation: the audiences are evaluated and their
    # events kept in the outbox, which `published_membership_events` publishes, with every
    # trigger, once the file is fixed (it fails naming the file until then).
    try:
        triggers = load_workflow_setup(settings).triggers
        trigger_problems: list[str] = []
    except DefinitionError as error:
        triggers, trigger_problems = {}, [str(problem) for problem in error.problems]
        context.log.warning(
            "workflow triggers with errors; the audiences are evaluated and their membership "
            "events wait in the outbox until they are fixed:\n" + "\n".join(trigger_problems)
        )
    # Which commit each definition is in this environment (`commit_id` "uncommitted" for a
    # working file that differs from development's latest commit).
    commits = version_metadata(settings)
    rows = ["| key | type | version | commit | message | name |", "|---|---|---|---|---|---|"]
    for d in definitions.values():
        commit = commits.get(model_name_for(d.key), {})
        message = commit.get("commit_message", "").replace("|", "\\|")
        rows.append(
            f"| {d.key} | {d.type} | {d.version} | {commit.get('commit_id', '')} | {message} "
            f"| {d.name} |"
        )
    return dg.MaterializeResult(
        metadata={
            "environment": settings.environment,
            "folder": str(settings.definitions_dir),
            "dynamic_audiences": sum(d.type == "dynamic" for d in definitions.values()),
            "static_audiences": sum(d.type == "static" for d in definitions.values()),
            "skipped_audiences": sorted(definition_set.skipped),
            "workflow_triggers": len(triggers),
            **({"workflow_trigger_problems": trigger_problems} if trigger_problems else {}),
            "definitions": dg.MetadataValue.md("\n".join(rows)),
        }
    )


@dg.asset_check(
    asset=DEFINITIONS_KEY,
    name=DEFINITIONS_CHECK,
    description=(
        "Every definition can be evaluated. When one has errors, it and the audiences that refer "
        "to it are skipped (their last members kept, no events) while the others are evaluated; "
        "this check then fails and names each problem's file and JSON path."
    ),
)
def every_definition_is_usable(definition_set: DefinitionSetParam) -> dg.AssetCheckResult:
    return skipped_audiences_check(definition_set)


def evaluation_arguments(lean: bool, state: Path | None) -> list[str]:
    """The dbt command of an evaluation: `lean` (the dbt project unchanged since the warehouse's
    last full build) leaves the views alone; else `state` (the manifest of that build) limits the
    rebuild to the audience views that changed; without either, everything is built."""
    if lean:
        return [
            "build",
            "--exclude",
            " ".join(UNCHANGED_WHEN_DEFINITIONS_ARE),
            # dbt writes its manifest twice per command, and run_results: 15 MB of JSON and
            # ~8 s of CPU each at 2,000 audiences (bench/analysis.md, "Thousands of audiences").
            # Nothing reads them after a re-evaluation (a full build keeps its manifest as the
            # state of the next definitions change), and dagster-dbt reads dbt's event stream.
            *LEAN_FLAGS,
            *GRAPH_FLAGS,
        ]
    if state is not None:
        return [
            "build",
            "--exclude",
            "tag:audience,state:unmodified",
            "--state",
            str(state),
            # As lean: the next change's state is `dbt parse`'s manifest of this project
            # (`keep_build_state`), not this build's (~5 s of CPU at 2,000 audiences).
            *LEAN_FLAGS,
            *GRAPH_FLAGS,
        ]
    return ["build", *GRAPH_FLAGS]


def dbt_selection(context: dg.AssetExecutionContext) -> list[str]:
    """The dbt selection of the run's dbt assets and checks, its size bounded whatever the run
    selects: the engine's own models and tests by name (a fixed set), the audience views by name
    up to `LISTED_AUDIENCE_VIEWS` and by `tag:audience` past it or when all are selected. A view
    selected through its tag and not by the run is built if the build's `--exclude` lets it (a
    changed definition) and reported by no materialization (`build_audiences` drops it)."""
    assets = context.assets_def
    manifest, translator, _ = get_manifest_and_translator_from_dbt_assets([assets])
    selected = context.selected_asset_keys & assets.keys
    checks = {
        *context.selected_asset_check_keys,
        # dagster-dbt runs, and reports, the source tests of what a run selects
        *get_checks_on_sources_upstream_of_selected_assets(assets, selected),
    }
    every_check = {spec.key for spec in assets.node_check_specs_by_output_name.values()}
    if selected == assets.keys and checks == every_check:
        return ["--select", "fqn:*"]  # dagster-dbt's selection of the whole dbt asset
    views, others, every_view = [], [], 0
    for key in assets.keys:
        unique_id = assets.get_asset_spec(key).metadata[DAGSTER_DBT_UNIQUE_ID_METADATA_KEY]
        node = manifest["nodes"][unique_id]
        is_view = "audience" in node.get("tags", ())
        every_view += is_view
        if key in selected:
            (views if is_view else others).append(".".join(node["fqn"]))
    if views and (len(views) > LISTED_AUDIENCE_VIEWS or len(views) == every_view):
        views = ["tag:audience"]
    tests = get_dbt_test_names_for_check_keys(translator, manifest, assets, checks)
    # Only the selected checks' tests: none through the models they test (dbt's indirect selection).
    return ["--select", " ".join([*others, *views, *tests]), "--indirect-selection", "empty"]


def build_audiences(
    context: dg.AssetExecutionContext,
    dbt: DbtCliResource,
    warehouse: WarehouseResource,
    config: EvaluationConfig,
    settings: SettingsParam,
):
    """Build users' attributes and every audience, at one fixed evaluation time (the body of the
    `audience_models` dbt assets, which `audience_models_from` makes from the manifest)."""
    evaluated_at = evaluation_time_for(config.evaluation_time or settings.evaluation_time)
    names = EnvironmentNames.of(settings)
    context.log.info(f"{settings.environment}: evaluation time {format_time(evaluated_at)}")
    fingerprint = project_fingerprint(settings.dbt_project_dir)
    with warehouse.connect() as connection:
        try:
            earlier = check_evaluation_time(connection, evaluated_at, config.allow_earlier)
        except EarlierEvaluationError as error:
            raise dg.Failure(description=str(error)) from None
        if earlier:
            context.log.warning(
                f"{format_time(evaluated_at)} is earlier than the last recorded evaluation: "
                "members are evaluated, no membership events are recorded"
            )
        set_evaluation_clock(connection, evaluated_at)
        reevaluated = {names.key(name) for name in REEVALUATED_MODELS}
        built_from = last_full_build(connection)
        lean = reevaluated <= context.selected_asset_keys and built_from == fingerprint
    # The audience views read the clock table, so while the definitions (the dbt project) are
    # unchanged a new evaluation only refreshes the attributes and rewrites the memberships.
    # After a definitions change, the audience views dbt sees unchanged against the manifest this
    # warehouse was built from are left as they are: editing one of 2,000 audiences rebuilds one.
    # (dagster-dbt keeps its own --select; an --exclude is how a run narrows it.)
    state = None if lean else build_state(settings.dbt_project_dir, built_from)
    arguments = evaluation_arguments(lean, state)
    if lean:
        context.log.info("re-evaluation: views unchanged")
    elif state is not None:
        context.log.info("definitions changed: rebuilding the changed audience views")
    else:
        context.log.info("full build: the dbt project changed")
    # The selection is ours (`dbt_selection`), not dagster-dbt's (one selector per model of a
    # subset): dbt starts without the run's context, which then maps its events to the run's assets.
    manifest, translator, _ = get_manifest_and_translator_from_dbt_assets([context.assets_def])
    invocation = dbt.cli(
        [*arguments, *dbt_selection(context)], manifest=manifest, dagster_dbt_translator=translator
    )
    invocation.context = context
    # DuckDB allows one writer: read member counts only after dbt has finished and let go.
    events = list(invocation.stream())
    # An earlier evaluation records no membership events: its audiences report their members only.
    audiences = _audience_metadata(warehouse, evaluated_at, with_changes=not earlier)
    # Each audience names the version it was evaluated from: its commit in this environment.
    for model, version in version_metadata(settings).items():
        if model in audiences:
            audiences[model].update(version)
    if not lean:
        with warehouse.connect() as connection:
            record_full_build(connection, fingerprint)
        keep_build_state(settings.dbt_project_dir, fingerprint)
    outputs: dict[dg.AssetKey, Any] = {}
    others = []
    for event in events:
        key = getattr(event, "asset_key", None)
        if isinstance(event, dg.Output) and key is None:
            key = context.asset_key_for_output(event.output_name)
        if not isinstance(event, (dg.Output, dg.AssetMaterialization)) or key is None:
            others.append(event)
            continue
        if key not in context.selected_asset_keys:  # built through `tag:audience`, not selected
            continue
        extra = {"evaluated_at": format_time(evaluated_at)}
        relative = key.path[len(names.prefix) :]
        if relative[0] == "audiences" and key.path[-1] in audiences:
            extra.update(audiences[key.path[-1]])
        if key.path[-1] == "audience_members":
            extra["member_counts"] = dg.MetadataValue.json(
                {model: values["member_count"] for model, values in audiences.items()}
            )
        outputs[key] = event.with_metadata({**event.metadata, **extra})
    # Every audience was evaluated, whether or not dbt rebuilt its view (a re-evaluation leaves
    # the views alone): each gets a materialization with its members, so the asset's history
    # (and its Plots tab) follows the member count run by run.
    for model, metadata in audiences.items():
        key = names.key("audiences", model)
        if key not in outputs and key in context.selected_asset_keys:
            outputs[key] = dg.MaterializeResult(
                asset_key=key,
                metadata={
                    **metadata,
                    "evaluated_at": format_time(evaluated_at),
                    "status": "members re-evaluated (view unchanged)",
                },
            )
    # A multi-asset yields its assets in dependency order; dbt's tests (checks) after them. Their
    # events (two per audience) are written together, not each in transactions of its own.
    with stored_together(context.instance):
        for key in TopologicalSorter(context.assets_def.asset_deps).static_order():
            if key in outputs:
                yield outputs.pop(key)
        yield from outputs.values()
        yield from others


@dg.asset_check(
    asset=dg.AssetKey("audience_evaluations"),
    description="Every audience in the catalog was evaluated in the latest run.",
)
def every_audience_built(
    warehouse: WarehouseResource, definition_set: DefinitionSetParam
) -> dg.AssetCheckResult:
    with warehouse.connect(read_only=True) as connection:
        # The evaluation audience_members holds: the latest run's, even when it was an earlier time.
        evaluated = {
            row[0]
            for row in connection.execute(
                "select audience_key from main.audience_evaluations where evaluated_at = $t",
                {"t": members_evaluated_at(connection)},
            ).fetchall()
        }
        catalog = {
            row[0]
            for row in connection.execute(
                "select audience_key from main.audience_catalog where not is_skipped"
            ).fetchall()
        }
    missing = sorted((catalog | set(definition_set.definitions)) - evaluated)
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={
            "evaluated": len(evaluated),
            "missing": missing,
            # reported by every_definition_is_usable
            "skipped": sorted(definition_set.skipped),
        },
    )


def audience_models_from(
    manifest: Path,
    evaluation_paths: Mapping[str, str] | None = None,
    names: EnvironmentNames | None = None,
) -> dg.AssetsDefinition:
    """The dbt project's models as assets (`build_audiences` builds them), keyed and grouped by
    `AudiencesTranslator` (under the environment's `names`); dbt tests on the `users` source
    become checks on the `users` asset. `evaluation_paths` (per model name, `evaluation_paths`)
    go into each audience's catalog entry."""
    translator = AudiencesTranslator(
        settings=DagsterDbtTranslatorSettings(enable_source_tests_as_checks=True)
    )
    translator.evaluation_paths = dict(evaluation_paths or {})
    translator.names = names = names or EnvironmentNames()
    cache_asset_and_check_keys()  # one output per audience: Dagster's cost per output, bounded
    return dbt_assets(
        # Read now, not through dagster-dbt's cache of manifests by path: a promotion evaluates
        # the target environment in the process that loaded its previous manifest.
        manifest=json.loads(manifest.read_bytes()),
        dagster_dbt_translator=translator,
        name=names.name("audience_models"),
    )(build_audiences)


def audience_models(settings: Settings) -> tuple[dg.AssetsDefinition, DefinitionSet]:
    """What depends on an environment's dbt project, made when the code location loads: its
    definitions (read once, as the models were generated from them: a definition with errors, or
    one that refers to it, is skipped with its last members kept) and its models' assets from the
    manifest that `prepare` checks against them. Loading never writes the models."""
    definition_set = project_definitions(settings)
    manifest = prepare(settings, definition_set)
    return (
        audience_models_from(
            manifest, evaluation_paths(settings, definition_set), EnvironmentNames.of(settings)
        ),
        definition_set,
    )


def evaluation_paths(settings: Settings, definition_set: DefinitionSet) -> dict[str, str]:
    """Per audience model: the path its changes take (`workflows/realtime.py`'s `paths`): real
    time on an identify through the API, the next pipeline run, or static changes."""
    from audiences.conditions.definitions import model_name_for
    from audiences.workflows.realtime import path_description, paths

    found = {
        model_name_for(key): path_description(reason)
        for key, reason in paths(
            definition_set.definitions, custom_audience_keys(settings.dbt_project_dir)
        ).items()
    }
    for key, definition in definition_set.definitions.items():
        if definition.type == "static":
            found[model_name_for(key)] = (
                "static: members are added and removed through the API, the CLI, uploads and "
                "syncs, and their events recorded at once"
            )
    return found


def skipped_audiences_check(definition_set: DefinitionSet) -> dg.AssetCheckResult:
    """Passes when every definition can be evaluated; else names each skipped audience and why."""
    problems = [str(problem) for problem in definition_set.reasons]
    rows = ["| audience | file | JSON path | problem |", "|---|---|---|---|"]
    rows += [
        f"| {key} | {problem.file} | {problem.json_path} | {problem.message.replace('|', chr(92) + '|')} |"
        for key, reasons in definition_set.skipped.items()
        for problem in reasons
    ]
    return dg.AssetCheckResult(
        passed=not definition_set.skipped,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            f"{len(definition_set.skipped)} audiences skipped: their definitions have errors (or refer to "
            "one that has); their last members are kept and they have no events"
            if definition_set.skipped
            else "every definition can be evaluated"
        ),
        metadata={
            "skipped_audiences": sorted(definition_set.skipped),
            "problems": dg.MetadataValue.json(problems),
            "skipped": dg.MetadataValue.md("\n".join(rows)),
        },
    )


def _audience_metadata(
    warehouse: WarehouseResource, evaluated_at, with_changes: bool = True
) -> dict[str, dict[str, int]]:
    """Per audience model at this evaluation: its member count, and how many users entered and
    exited it (what the membership diff that follows will record; static audiences, whose events are
    written when they change, and an earlier evaluation, which records none, report members only)."""
    with warehouse.connect() as connection:
        rows = connection.execute(
            """
            select catalog.model_name, catalog.audience_key, evaluations.member_count
            from main.audience_evaluations as evaluations
            join main.audience_catalog as catalog using (audience_key)
            where evaluations.evaluated_at = $evaluated_at
            """,
            {"evaluated_at": evaluated_at},
        ).fetchall()
        moved = pending_changes(connection) if with_changes else {}
    metadata = {}
    for model, audience_key, member_count in rows:
        metadata[model] = {"member_count": member_count}
        if audience_key in moved:
            metadata[model]["entered"], metadata[model]["exited"] = moved[audience_key]
    return metadata
