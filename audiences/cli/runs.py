"""Running the main job through Dagster and publishing its events: `run`, `publish`."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import sys
from pathlib import Path

from audiences.cli.common import open_store, write_warehouse
from audiences.settings import Settings, environment_set, format_time


def run(settings: Settings, arguments) -> int:
    """Run the main job: load every user source, validate the definitions, and materialize every
    audience through Dagster at one evaluation time; then print, for that evaluation, each
    audience's members and how many users entered and exited it, the deliveries queued and sent,
    and where the results are.

    The run is recorded in the Dagster instance that `dg dev` shows (DAGSTER_HOME, by default
    `dagster_home` in the working folder). While another run writes the warehouse, this one waits
    for it and says which run it waits for.

    Time only moves forward: an evaluation time earlier than the last recorded one is refused, and
    with --allow-earlier it is evaluated (members and counts) without recording membership events
    or triggering workflows."""
    from audiences.api.keys import refuse_other_environment
    from audiences.dbt.project import generate as generate_models
    from audiences.delivery.sinks import load_sinks
    from audiences.lifecycle.commits import prepare_environment
    from audiences.settings import require_dbt_project
    from audiences.warehouse.lock import hold_writer_lock

    # A store of another environment is refused before anything is read or written.
    refuse_other_environment(settings.store_url, settings.environment)
    prepare_environment(settings)  # a later environment evaluates what its store holds
    require_dbt_project(settings.dbt_project_dir)  # before Dagster loads it, with a plain message
    # The models follow the definitions before the code location loads (loading never writes them).
    generate_models(settings)
    sinks, default_sink = load_sinks(
        settings.sinks_file
    )  # a bad sinks file fails here, not in the run
    # The lock covers the checks and the summary too: a run that starts after ours must not take
    # the file from them.
    with hold_writer_lock(
        settings.duckdb_path,
        {"trigger": "audiences run"},
        report=lambda message: print(message, file=sys.stderr, flush=True),
    ):
        return _run(settings, arguments, sinks, default_sink)


def _run(settings: Settings, arguments, sinks: dict, default_sink: str) -> int:
    from audiences.warehouse.evaluation import check_evaluation_time, evaluation_time_for
    from audiences.warehouse.queries import connect, last_evaluation

    evaluated_at = evaluation_time_for(settings.evaluation_time)
    earlier = False
    if settings.duckdb_path.exists():  # refused before anything is loaded or written
        with connect(settings.duckdb_path, read_only=True) as connection:
            earlier = check_evaluation_time(connection, evaluated_at, arguments.allow_earlier)
    with environment_set(settings.environment_variables()):
        outcome = _execute_main_job(
            evaluated_at,
            settings.dagster_home,
            environment=settings.environment,
            instance=getattr(arguments, "instance", None),
            verbose=arguments.verbose,
            debug=arguments.debug,
            allow_earlier=arguments.allow_earlier,
            tags={
                "audiences/environment": settings.environment,
                **getattr(arguments, "run_tags", {}),
            },
        )
    for warning in outcome.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not outcome.success:
        for failure in outcome.failures or [
            "the run failed (--verbose shows Dagster's and dbt's log)"
        ]:
            print(f"error: {failure}", file=sys.stderr)
        return 130 if any(failure.endswith(INTERRUPTED) for failure in outcome.failures) else 1
    with connect(settings.duckdb_path, read_only=True) as connection:
        counts = last_evaluation(connection, evaluated_at)
        users, quarantined = connection.execute(
            "select (select count(*) from raw.users where deleted_at is null), (select count(*) from raw.users_quarantine)"
        ).fetchall()[0]
    print(
        f"evaluated at {format_time(evaluated_at)}: {users:,} users, {quarantined:,} quarantined rows "
        f"(see raw.users_quarantine)"
    )
    if earlier:
        print(
            "  earlier than the last recorded evaluation: no membership events recorded, no workflows triggered"
        )
    # An archived audience is no longer evaluated; the run that saw its members exit lists it.
    evaluated = {row["audience_key"] for row in counts}
    counts = counts + [
        {"audience_key": key, "audience_type": "archived", "member_count": 0}
        for key in sorted(set(outcome.changes) - evaluated)
    ]
    width = max((len(row["audience_key"]) for row in counts), default=10)
    print(f"  {'audience':<{width}}  {'type':<8}  {'members':>9}  {'entered':>8}  {'exited':>8}")
    for row in counts:
        change = outcome.changes.get(row["audience_key"], {})
        note = (
            "first evaluation: no triggers"
            if change.get("is_backfill")
            else f"held as {change['held_batch']}: `audiences release` or `discard` it"
            if change.get("held_batch")
            else ""
        )
        print(
            f"  {row['audience_key']:<{width}}  {row['audience_type']:<8}  {row['member_count']:>9,}  "
            f"{'+' + format(change.get('entered', 0), ','):>8}  {'-' + format(change.get('exited', 0), ','):>8}"
            f"  {note}".rstrip()
        )
    published, sent = outcome.published, outcome.delivered
    queued = published.get("deliveries_created", 0) + published.get("static_deliveries_created", 0)
    print(
        f"deliveries: {queued:,} queued ({published.get('deliveries_held', 0):,} held), "
        f"{sent.get('delivered', 0):,} delivered, {sent.get('retried_later', 0):,} to retry, "
        f"{sent.get('dead_lettered', 0):,} dead-lettered (`audiences deliveries`)"
    )
    print("results:")
    print(
        f"  warehouse  {settings.duckdb_path} (audience_members, audience_evaluations, audiences.<key>)"
    )
    print(f"  store      {settings.store_url} (`audiences events`, `audiences members`)")
    for name, sink in sorted(sinks.items()):
        where = (
            getattr(sink, "path", None)
            or getattr(sink, "url", None)
            or getattr(sink, "base_url", "")
        )
        print(f"  sink       {name}{' (default)' if name == default_sink else ''}: {where}")
    if outcome.skipped:
        print(
            f"error: skipped {len(outcome.skipped)} audiences whose definitions have errors, or refer to one that "
            f"has ({', '.join(outcome.skipped)}); their members are kept as they were and they have no events:",
            file=sys.stderr,
        )
        for problem in outcome.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 0


def _skipped_audiences(result) -> tuple[list[str], list[str]]:
    """The audiences a run skipped, and why, from its definitions check."""
    from pipelines.defs.audiences import DEFINITIONS_CHECK

    for evaluation in result.get_asset_check_evaluations():
        if evaluation.check_name == DEFINITIONS_CHECK and not evaluation.passed:
            return (
                list(evaluation.metadata["skipped_audiences"].value),
                list(evaluation.metadata["problems"].value),
            )
    return [], []


@dataclasses.dataclass
class _RunOutcome:
    """What `run` needs from a Dagster run: success, the failed steps' messages, warnings logged,
    the metadata of the membership and delivery assets, and the audiences skipped for their
    definitions' errors (with each problem)."""

    success: bool
    failures: list[str]
    warnings: list[str]
    changes: dict
    published: dict
    delivered: dict
    skipped: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)


def _execute_main_job(
    evaluated_at,
    dagster_home: Path,
    verbose: bool = False,
    debug: bool = False,
    allow_earlier: bool = False,
    tags: dict[str, str] | None = None,
    environment: str | None = None,
    instance=None,
) -> _RunOutcome:
    import dagster as dg

    from audiences.settings import Settings, prepare_dagster_home
    from pipelines import build_definitions
    from pipelines.defs.resources import EnvironmentNames
    from pipelines.defs.schedules import MAIN_JOB

    # Only the environment this run evaluates is loaded; its job, ops and asset keys are named as
    # in the code location that serves every environment (`EnvironmentNames`).
    names = EnvironmentNames.of(Settings.from_env())
    defs = build_definitions([environment] if environment else None)
    job = defs.resolve_job_def(names.name(MAIN_JOB))
    # Without --verbose, Dagster's console stays quiet: its warnings and failures are read back from
    # the run's event log and printed as the user's messages, not as Dagster's tracebacks.
    run_config = {
        "ops": {
            names.name("audience_models"): {
                "config": {
                    "evaluation_time": format_time(evaluated_at),
                    "allow_earlier": allow_earlier,
                }
            }
        },
        "loggers": {"console": {"config": {"log_level": "DEBUG" if verbose else "CRITICAL"}}},
    }
    # A promotion's run carries its commits and impact (audiences/lifecycle/commands.py).
    tags = {"audiences/launched_by": "audiences run", **(tags or {})}
    # The instance `dg dev` shows, so that the run appears in its runs list (or the one given:
    # the promotion job's, whose run this evaluation belongs to).
    opened = (
        contextlib.nullcontext(instance)
        if instance is not None
        else dg.DagsterInstance.from_config(str(prepare_dagster_home(dagster_home)))
    )
    with opened as instance:
        if verbose:
            result = job.execute_in_process(
                run_config=run_config, instance=instance, raise_on_error=False, tags=tags
            )
        else:
            # dbt's own progress lines are echoed to stdout; keep them for --verbose.
            with contextlib.redirect_stdout(io.StringIO()):
                result = job.execute_in_process(
                    run_config=run_config, instance=instance, raise_on_error=False, tags=tags
                )
        warnings = (
            []
            if verbose
            else [
                f"{entry.step_key}: {entry.user_message}" if entry.step_key else entry.user_message
                for entry in instance.all_logs(result.run_id)
                if not entry.is_dagster_event and entry.level == logging.WARNING
            ]
        )
    failures = []
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        if debug and error is not None:
            sys.stderr.write(error.to_string())
        failures.append(f"step {event.step_key} failed: {_step_error_message(error)}")

    def metadata(node: str) -> dict:
        found = result.asset_materializations_for_node(names.name(node)) if result.success else []
        return {key: value.value for key, value in found[-1].metadata.items()} if found else {}

    return _RunOutcome(
        result.success,
        failures,
        warnings,
        metadata("membership_changes").get("changes") or {},
        metadata("published_membership_events"),
        metadata("workflow_trigger_deliveries"),
        *_skipped_audiences(result),
    )


# A step stopped by SIGTERM or Ctrl-C (Dagster's handlers raise in the step): the run exits 130.
INTERRUPTED = "interrupted (SIGTERM or Ctrl-C)"


def _step_error_message(error) -> str:
    """The user-facing message of a failed step: the error Dagster wrapped (an `Error occurred while
    executing op` names only Dagster), without its module path; a `dg.Failure`'s own description."""
    while error is not None and error.cls_name.startswith("Dagster") and error.cause is not None:
        error = error.cause
    if error is None:
        return "no error recorded"
    if error.cls_name == "DagsterExecutionInterruptedError":
        return INTERRUPTED
    message = error.message.strip()
    qualified = message.split(":", 1)[0]
    if qualified.endswith(error.cls_name) and " " not in qualified:
        message = message.split(":", 1)[1].strip() if ":" in message else ""
        user_error = error.cls_name in (
            "Failure",
            "SourceError",
            "EventSourceError",
            "DefinitionError",
            "WarehouseError",
            "ValueError",
            "FileNotFoundError",
            "SinkConfigError",
            "StoreBusy",
            "DbtCliRuntimeError",
            "DagsterDbtCliRuntimeError",
        )
        if not user_error:
            message = f"{error.cls_name}: {message} (unexpected; --debug shows the traceback)"
    return message


def publish(settings: Settings, arguments) -> int:
    """Publish the warehouse's unpublished membership events to the store and queue their workflow
    triggers (the pipeline does this after each evaluation; this is for recovery)."""
    from audiences.delivery.setup import load_workflow_setup
    from audiences.warehouse.evaluation import evaluation_time_for
    from audiences.warehouse.queries import WarehouseError
    from audiences.workflows.publish import publish_outbox

    if (
        not settings.duckdb_path.exists()
    ):  # nothing to publish, and no empty warehouse to leave behind
        raise WarehouseError(f"{settings.duckdb_path}: no warehouse yet; run `audiences run` first")
    setup = load_workflow_setup(settings)
    with write_warehouse(settings, "audiences publish") as connection:
        report = publish_outbox(
            connection,
            open_store(settings),
            setup.triggers,
            setup.default_sink,
            evaluation_time_for(settings.evaluation_time),
        )
    print(report)
    return 0


def register(command) -> None:
    """Add this group's commands to the parser (`command` makes one subcommand)."""
    sub = command("run", run, "load users and materialize every audience through Dagster")
    sub.add_argument("--verbose", action="store_true", help="show Dagster's and dbt's full log")
    sub.add_argument(
        "--allow-earlier",
        action="store_true",
        help="evaluate at a time earlier than the last recorded evaluation, recording the "
        "members but no membership events or workflow triggers",
    )
    command(
        "publish", publish, "publish the warehouse's unpublished membership events to the store"
    )
