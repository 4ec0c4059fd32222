"""Sensors: evaluate as soon as a user source changes (file sizes and times, or a table watermark)."""

import json

import dagster as dg

from audiences.settings import Settings
from audiences.users import configured_sources
from audiences.users.sources import source_fingerprint
from pipelines.defs.schedules import MAIN_JOB


@dg.sensor(
    job_name=MAIN_JOB,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Requests the main job (load users, evaluate audiences, publish membership events) when any "
        "user source changes or a CSV file is dropped in the uploads folder. Runs are serialized by "
        "the `audiences/duckdb` tag (one writer)."
    ),
)
def user_sources_changed(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    settings = Settings.from_env()
    sources = configured_sources(settings)
    fingerprints = {}
    uploads = sorted((settings.definitions_dir.parent / "uploads").glob("*/*.csv"))
    if uploads:  # CSV files dropped for static audiences
        fingerprints["uploads"] = ";".join(f"{p.parent.name}/{p.name}:{p.stat().st_size}" for p in uploads)
    for source in sources:
        try:
            fingerprints[source.name] = source_fingerprint(source)
        except Exception as error:  # a source that cannot be read now is retried on the next tick
            context.log.warning(f"{source.name}: cannot read its fingerprint: {error}")
            fingerprints[source.name] = (json.loads(context.cursor) if context.cursor else {}).get(source.name, "")
    previous = json.loads(context.cursor) if context.cursor else None
    cursor = json.dumps(fingerprints, sort_keys=True)
    if previous == fingerprints:
        return dg.SensorResult(skip_reason="no user source changed", cursor=cursor)
    changed = sorted(name for name in fingerprints if (previous or {}).get(name) != fingerprints[name])
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=cursor, tags={"audiences/changed_sources": ",".join(changed)})],
        cursor=cursor,
    )


@dg.definitions
def sensors() -> dg.Definitions:
    return dg.Definitions(sensors=[user_sources_changed])
