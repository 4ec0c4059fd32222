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

reevaluate_audiences = dg.define_asset_job(
    REEVALUATE_JOB,
    executor_def=dg.in_process_executor,
    selection=dg.AssetSelection.all() - dg.AssetSelection.keys("users"),
    description="Re-evaluate every audience against the current users at a new evaluation time.",
    tags=DUCKDB_WRITER,
)


@dg.schedule(job=reevaluate_audiences, cron_schedule="*/15 * * * *", default_status=dg.DefaultScheduleStatus.RUNNING)
def reevaluate_every_15_minutes(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    """Every 15 minutes (the smallest relative time Knock allows), evaluated at the tick's time,
    so users enter and leave time-relative audiences as time passes without any data change."""
    evaluation_time = context.scheduled_execution_time.isoformat()
    return dg.RunRequest(
        run_key=evaluation_time,
        run_config={"ops": {"audience_models": {"config": {"evaluation_time": evaluation_time}}}},
    )


@dg.definitions
def schedules() -> dg.Definitions:
    return dg.Definitions(jobs=[audiences_job, reevaluate_audiences], schedules=[reevaluate_every_15_minutes])
