"""Sensors: evaluate as soon as users change (a source's files or table watermark, a dropped upload,
identify calls queued through the API), and deliver when deliveries are due."""

import json
from pathlib import Path

import dagster as dg
import sqlalchemy as sa

from audiences.events.loading import configured_event_sources, event_source_fingerprint
from audiences.settings import Settings
from audiences.store.profiles import identify_queue_waiting
from audiences.store.tenants import tenant_queue_waiting
from audiences.users import configured_sources, configured_tenant_sources
from audiences.users.sources import source_fingerprint
from pipelines.defs.resources import EnvironmentNames
from pipelines.defs.schedules import DELIVERY_JOB, MAIN_JOB
from pipelines.defs.static import uploads_dir

IDENTIFY_QUEUE = (
    "identify_queue"  # the fingerprint of the store's identify queue, beside the sources'
)
TENANT_QUEUE = "tenant_queue"  # ... and of its tenant queue


def existing_store(settings: Settings):
    """The membership store, or None when there is none yet (a sensor must not create it)."""
    from audiences.store.database import MembershipStore

    url = sa.engine.make_url(settings.store_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        return None
    return MembershipStore(settings.store_url)


SOURCES_DESCRIPTION = (
    "Requests the main job (load users, evaluate audiences, publish membership events) when any "
    "user source changes, an event source gains files or rows, a CSV file is dropped in the uploads folder, or identify calls (the "
    "API's `PUT /v1/users/{id}`, uploads) wait in the store's queue. The run's tags say which "
    "(`audiences/changed_sources`). Runs are serialized by the `audiences/duckdb` tag (one writer)."
)
DELIVERIES_DESCRIPTION = (
    "Requests a delivery run when workflow triggers are due (retries, broadcasts, triggers a run "
    "did not finish sending), and none is running: one indexed query on the store per tick, "
    "and no run when nothing is due. `audiences deliver --watch` is the always-on alternative."
)


def environment_sensors(settings: Settings, names: EnvironmentNames) -> list[dg.SensorDefinition]:
    """An environment's two sensors, reading its own sources, uploads and store, and requesting
    its own jobs (`EnvironmentNames`)."""
    where = f" ({settings.environment})"

    @dg.sensor(
        name=names.name("user_sources_changed"),
        job_name=names.name(MAIN_JOB),
        minimum_interval_seconds=5,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=SOURCES_DESCRIPTION + where,
    )
    def sources(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        return sources_changed(context, settings)

    @dg.sensor(
        name=names.name("deliveries_due"),
        job_name=names.name(DELIVERY_JOB),
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=DELIVERIES_DESCRIPTION + where,
    )
    def deliveries(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        return due_deliveries(context, settings, names.name(DELIVERY_JOB))

    return [sources, deliveries]


@dg.sensor(
    job_name=MAIN_JOB,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=SOURCES_DESCRIPTION,
)
def user_sources_changed(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """The sensor of the environment the settings name (AUDIENCES_ENV)."""
    return sources_changed(context, Settings.from_env())


def sources_changed(context: dg.SensorEvaluationContext, settings: Settings) -> dg.SensorResult:
    """A run request when a source, an upload, an event source or the store's queues changed
    since the cursor's fingerprints."""
    sources = configured_sources(settings) + configured_tenant_sources(settings)
    previous = json.loads(context.cursor) if context.cursor else None
    fingerprints = {}
    uploads = sorted(uploads_dir(settings).glob("*/*.csv"))
    if uploads:  # CSV files dropped for static audiences
        fingerprints["uploads"] = ";".join(
            f"{p.parent.name}/{p.name}:{p.stat().st_size}" for p in uploads
        )
    for source in sources:
        try:
            fingerprints[source.name] = source_fingerprint(source)
        except Exception as error:  # a source that cannot be read now is retried on the next tick
            context.log.warning(f"{source.name}: cannot read its fingerprint: {error}")
            fingerprints[source.name] = (previous or {}).get(source.name, "")
    for source in configured_event_sources(settings):  # new event files or rows
        key = f"events/{source.name}"
        try:
            fingerprints[key] = event_source_fingerprint(source)
        except Exception as error:
            context.log.warning(f"{key}: cannot read its fingerprint: {error}")
            fingerprints[key] = (previous or {}).get(key, "")
    # The newest identify call waiting: a new one changes it; once loaded, the last one's stays.
    waiting, newest = 0, None
    store = existing_store(settings)
    if store is not None:
        try:
            waiting, newest = identify_queue_waiting(store)
        except sa.exc.SQLAlchemyError as error:  # no queue yet, or the store is unreachable now
            context.log.warning(f"cannot read the identify queue: {error}")
        finally:
            store.dispose()
    if newest is not None:
        fingerprints[IDENTIFY_QUEUE] = str(newest)
    elif (previous or {}).get(IDENTIFY_QUEUE):
        fingerprints[IDENTIFY_QUEUE] = previous[IDENTIFY_QUEUE]
    # Tenant writes (`PUT /v1/tenants/{id}`) wait in their own queue, read the same way.
    tenants_newest = None
    store = existing_store(settings)
    if store is not None:
        try:
            tenants_newest = tenant_queue_waiting(store)[1]
        except sa.exc.SQLAlchemyError as error:
            context.log.warning(f"cannot read the tenant queue: {error}")
        finally:
            store.dispose()
    if tenants_newest is not None:
        fingerprints[TENANT_QUEUE] = str(tenants_newest)
    elif (previous or {}).get(TENANT_QUEUE):
        fingerprints[TENANT_QUEUE] = previous[TENANT_QUEUE]
    cursor = json.dumps(fingerprints, sort_keys=True)
    if previous == fingerprints:
        return dg.SensorResult(
            skip_reason="no user source changed and no identify call waits", cursor=cursor
        )
    changed = sorted(
        name for name in fingerprints if (previous or {}).get(name) != fingerprints[name]
    )
    tags = {"audiences/changed_sources": ",".join(changed)}
    if waiting:
        tags["audiences/identify_calls_waiting"] = str(waiting)
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=cursor, tags=tags)], cursor=cursor)


@dg.sensor(
    job_name=DELIVERY_JOB,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=DELIVERIES_DESCRIPTION,
)
def deliveries_due(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """The sensor of the environment the settings name (AUDIENCES_ENV)."""
    return due_deliveries(context, Settings.from_env(), DELIVERY_JOB)


def due_deliveries(
    context: dg.SensorEvaluationContext, settings: Settings, job_name: str
) -> dg.SensorResult:
    """A delivery run request when deliveries are due in the settings' store and no run of
    `job_name` is delivering."""
    from audiences.store.database import deliveries, now_text

    store = existing_store(settings)
    if store is None:
        return dg.SensorResult(skip_reason="no membership store yet")
    now = now_text()
    columns = deliveries.c
    try:
        with store.read_engine.connect() as connection:
            # Due as a delivery worker sees it: pending, its time come, and not claimed by a worker
            # whose lease still runs (`audiences deliver --watch` sending it now).
            due, newest = connection.execute(
                sa.select(sa.func.count(), sa.func.max(columns.next_attempt_at)).where(
                    columns.status == "pending",
                    columns.next_attempt_at <= now,
                    sa.or_(columns.claimed_until.is_(None), columns.claimed_until < now),
                )
            ).one()
    except sa.exc.SQLAlchemyError as error:
        return dg.SensorResult(skip_reason=f"cannot read the deliveries: {error}")
    finally:
        store.dispose()
    if not due:
        return dg.SensorResult(skip_reason="no delivery is due", cursor="")
    state = f"{due}:{newest}"
    if state == context.cursor:
        # The last delivery run left exactly these (a sink that is not configured, say): a new
        # delivery or a retry coming due changes the count or the newest time.
        return dg.SensorResult(
            skip_reason=f"{due} deliveries are due, as after the last delivery run"
        )
    active = context.instance.get_runs(
        filters=dg.RunsFilter(
            job_name=job_name,
            statuses=[
                dg.DagsterRunStatus.QUEUED,
                dg.DagsterRunStatus.NOT_STARTED,
                dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED,
            ],
        ),
        limit=1,
    )
    if active:
        return dg.SensorResult(
            skip_reason=f"{due} deliveries are due; run {active[0].run_id} is delivering"
        )
    return dg.SensorResult(
        run_requests=[dg.RunRequest(tags={"audiences/deliveries_due": str(due)})], cursor=state
    )
