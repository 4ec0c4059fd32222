"""Jobs and schedules: the main job, and re-evaluation so time-relative conditions move users.

Each environment has its own (`environment_jobs`), named by `EnvironmentNames`: the first
environment's `audiences_job`, a later one's `production__audiences_job`. The module-level objects
are the first environment's, for code that imports them by name."""

import dagster as dg

from pipelines.defs.resources import EnvironmentNames

MAIN_JOB = "audiences_job"
REEVALUATE_JOB = "reevaluate_audiences"
DELIVERY_JOB = "deliver_workflow_triggers"
REEVALUATION_SCHEDULE = "reevaluate_every_15_minutes"
# Every 15 minutes: the smallest relative time Knock allows (the DuckDB and the Spark schedules).
REEVALUATION_CRON = "*/15 * * * *"


def writer_tag(names: EnvironmentNames) -> dict[str, str]:
    """The one-writer tag of an environment's warehouse: `writer`, or `writer-<environment>`.
    DuckDB allows one writer: runs that write it carry this tag, and dagster_home/dagster.yaml
    limits each of its values (each environment has its own warehouse) to one run at a time."""
    return {"audiences/duckdb": "-".join(["writer", *names.prefix])}


def identify_queue_only(names: EnvironmentNames) -> dict:
    """The `users` asset loads only the identify queue in a re-evaluation: the sources are the
    sensor's."""
    return {names.name("users"): {"config": {"load_sources": False}}}


def environment_jobs(
    names: EnvironmentNames, selection: dg.AssetSelection, deliveries: dg.AssetSelection
) -> tuple:
    """An environment's main job, re-evaluation job and delivery job over its assets
    (`selection`, `deliveries`), and the schedule of its re-evaluations."""
    where = f" ({names.environment})" if names.environment else ""
    tags = {**writer_tag(names), **names.tags}
    # Steps run one after another in the run's process: DuckDB allows one writer, and Dagster's
    # default executor would run independent steps (users, uploads, syncs, definitions) in
    # parallel processes.
    main = dg.define_asset_job(
        names.name(MAIN_JOB),
        executor_def=dg.in_process_executor,
        selection=selection,
        description="Load every user source, validate definitions, materialize every audience, "
        f"publish membership events and deliver workflow triggers{where}.",
        tags=tags,
    )
    reevaluate = dg.define_asset_job(
        names.name(REEVALUATE_JOB),
        executor_def=dg.in_process_executor,
        selection=selection,
        description="Re-evaluate every audience at a new evaluation time, after loading the "
        f"identify calls queued since the last run (the sources are not read again){where}.",
        tags=tags,
        config={"ops": identify_queue_only(names)},
    )
    deliver = dg.define_asset_job(
        names.name(DELIVERY_JOB),
        selection=deliveries,
        description="Send due workflow triggers (retries included); touches only the membership "
        f"store. The `deliveries_due` sensor starts it when deliveries are due{where}.",
        tags=names.tags,
    )

    @dg.schedule(
        name=names.name(REEVALUATION_SCHEDULE),
        job=reevaluate,
        cron_schedule=REEVALUATION_CRON,
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    def reevaluate_every_15_minutes(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        """Every 15 minutes (the smallest relative time Knock allows), evaluated at the tick's
        time, so users enter and leave time-relative audiences as time passes without any data
        change, and identify calls queued since the last run are loaded first."""
        evaluation_time = context.scheduled_execution_time.isoformat()
        return dg.RunRequest(
            run_key=evaluation_time,
            run_config={
                "ops": {
                    names.name("audience_models"): {"config": {"evaluation_time": evaluation_time}},
                    **identify_queue_only(names),
                }
            },
        )

    return main, reevaluate, deliver, reevaluate_every_15_minutes


# The first environment's, as every asset of a code location serving only it.
audiences_job, reevaluate_audiences, deliver_workflow_triggers, reevaluate_every_15_minutes = (
    environment_jobs(
        EnvironmentNames(),
        dg.AssetSelection.all(),
        dg.AssetSelection.assets("workflow_trigger_deliveries"),
    )
)
