"""Jobs and schedules: the main job, and re-evaluation so time-relative conditions move users."""

import dagster as dg

MAIN_JOB = "audiences_job"
REEVALUATE_JOB = "reevaluate_audiences"
DELIVERY_JOB = "deliver_workflow_triggers"
# DuckDB allows one writer: runs that write it carry this tag, and dagster_home/dagster.yaml limits
# the tag to one run at a time.
DUCKDB_WRITER = {"audiences/duckdb": "writer"}

# Steps run one after another in the run's process: DuckDB allows one writer, and Dagster's default
# executor would run independent steps (users, uploads, syncs, definitions) in parallel processes.
audiences_job = dg.define_asset_job(
    MAIN_JOB,
    executor_def=dg.in_process_executor,
    selection=dg.AssetSelection.all(),
    description="Load every user source, validate definitions, materialize every audience, publish "
    "membership events and deliver workflow triggers.",
    tags=DUCKDB_WRITER,
)

# The `users` asset loads only the identify queue in a re-evaluation: the sources are the sensor's.
IDENTIFY_QUEUE_ONLY = {"users": {"config": {"load_sources": False}}}

reevaluate_audiences = dg.define_asset_job(
    REEVALUATE_JOB,
    executor_def=dg.in_process_executor,
    selection=dg.AssetSelection.all(),
    description="Re-evaluate every audience at a new evaluation time, after loading the identify calls "
    "queued since the last run (the sources are not read again).",
    tags=DUCKDB_WRITER,
    config={"ops": IDENTIFY_QUEUE_ONLY},
)

deliver_workflow_triggers = dg.define_asset_job(
    DELIVERY_JOB,
    selection=dg.AssetSelection.assets("workflow_trigger_deliveries"),
    description="Send due workflow triggers (retries included); touches only the membership store. "
    "The `deliveries_due` sensor starts it when deliveries are due.",
)


@dg.schedule(
    job=reevaluate_audiences,
    cron_schedule="*/15 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def reevaluate_every_15_minutes(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    """Every 15 minutes (the smallest relative time Knock allows), evaluated at the tick's time,
    so users enter and leave time-relative audiences as time passes without any data change, and
    identify calls queued since the last run are loaded first."""
    evaluation_time = context.scheduled_execution_time.isoformat()
    return dg.RunRequest(
        run_key=evaluation_time,
        run_config={
            "ops": {
                "audience_models": {"config": {"evaluation_time": evaluation_time}},
                **IDENTIFY_QUEUE_ONLY,
            }
        },
    )
