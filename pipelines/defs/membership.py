"""Membership events: diff each evaluation into the outbox, publish it, and deliver triggers."""

import dagster as dg

from audiences.conditions.definitions import DefinitionError
from audiences.delivery.setup import load_workflow_setup
from audiences.membership.changes import AudienceChanges, CircuitBreaker, record_changes
from audiences.settings import format_time
from audiences.store.commits import archived_in
from audiences.warehouse.evaluation import (
    is_earlier_evaluation,
    last_recorded_evaluation,
    members_evaluated_at,
)
from audiences.workflows.publish import process_static_triggers, publish_outbox
from audiences.workflows.realtime import (
    import_realtime_events,
    publish_plan,
    realtime_disagreements,
)
from pipelines.defs.resources import (
    EnvironmentNames,
    MembershipStoreResource,
    SettingsParam,
    WarehouseResource,
)

# Most deliveries one pass inside a pipeline run sends, and most seconds it spends on one sink (a
# receiver that hangs then delays only its own deliveries, until the `deliveries_due` sensor's next
# run); the rest wait for that sensor.
PASS_LIMIT = 50_000
PASS_SECONDS_PER_SINK = 50.0


@dg.asset(
    key="membership_changes",
    deps=[dg.AssetKey("audience_evaluations")],
    group_name="membership",
    kinds={"duckdb"},
    description=(
        "Entered / exited events of the latest evaluation, diffed against the open membership "
        "intervals and written to the warehouse's outbox (`raw.membership_outbox`) with "
        "deterministic event ids; validity intervals (`raw.membership_intervals`) keep the "
        "history. A new audience's first members are recorded as backfill (no triggers). When "
        "a run moves too large a share of an audience, its events are held for a person to "
        "release or discard. An archived audience's members exit, once. The API's real-time "
        "events whose patches this run loaded join the history first, so none is emitted twice; "
        "a correction of one is counted in `realtime_disagreements`."
    ),
)
def membership_changes(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    store: MembershipStoreResource,
    settings: SettingsParam,
) -> dg.MaterializeResult:
    breaker = CircuitBreaker(settings.breaker_share, settings.breaker_minimum)
    with warehouse.connect() as connection:
        # The time of the memberships the diff reads, not the latest evaluation's: an earlier
        # evaluation (allow_earlier) is no membership change, and records nothing.
        evaluated_at = members_evaluated_at(connection)
        if is_earlier_evaluation(connection):
            last = last_recorded_evaluation(connection)
            context.log.warning(
                f"members evaluated at {format_time(evaluated_at)}, earlier than the last "
                f"recorded evaluation {format_time(last)}: no membership events recorded"
            )
            return dg.MaterializeResult(
                metadata={
                    "evaluated_at": format_time(evaluated_at),
                    "entered": 0,
                    "exited": 0,
                    "held_batches": [],
                    "skipped": f"earlier than the last recorded evaluation ({format_time(last)})",
                }
            )
        # Real time's events whose patches this run loaded join the history first: the diff then
        # repeats none of them, and what it still finds against them is a disagreement.
        imported = import_realtime_events(connection, store.open(), evaluated_at)
        # An audience archived in this environment: its members exit once (`record_changes`).
        archived = archived_in(settings.store_url)
        summary = record_changes(connection, evaluated_at, breaker, archived=archived)
        disagreements = realtime_disagreements(connection, evaluated_at)
    for disagreement in disagreements[:20]:
        context.log.error(
            f"real time disagreed with the batch on {disagreement['audience_key']} / "
            f"{disagreement['user_id']}: real time recorded {disagreement['realtime_event']} "
            f"#{disagreement['realtime_entry']}, the batch corrects it with "
            f"{disagreement['event_type']} #{disagreement['entry_number']} (a defect)"
        )
    rows = ["| audience | entered | exited | members before | note |", "|---|---|---|---|---|"]
    for change in summary.audiences:
        note = change_note(change)
        rows.append(
            f"| {change.audience_key} | {change.entered} | {change.exited} | {change.size_before} | {note} |"
        )
    for held in summary.held:
        context.log.warning(
            f"{held.audience_key}: {held.entered} entered and {held.exited} exited of {held.size_before}: "
            f"events held as batch {held.held_batch}; `audiences release {held.held_batch}` or "
            f"`audiences discard {held.held_batch}`"
        )
    return dg.MaterializeResult(
        metadata={
            "evaluated_at": format_time(evaluated_at),
            "entered": summary.entered,
            "exited": summary.exited,
            "held_batches": [held.held_batch for held in summary.held],
            "realtime_events_imported": imported,
            # The batch wins; each of these is a defect of the real-time path.
            "realtime_disagreements": len(disagreements),
            "changes_per_audience": dg.MetadataValue.md("\n".join(rows)),
            # The same, for `audiences run`'s summary.
            "changes": dg.MetadataValue.json(
                {
                    change.audience_key: {
                        "entered": change.entered,
                        "exited": change.exited,
                        "is_backfill": change.is_backfill,
                        "held_batch": change.held_batch,
                    }
                    for change in summary.audiences
                }
            ),
        }
    )


@dg.asset_check(
    asset=membership_changes,
    description=(
        "No audience moved more than the circuit breaker allows in this run. When it fails, the "
        "run's events for that audience are held until released or discarded."
    ),
)
def no_mass_membership_change(
    context: dg.AssetCheckExecutionContext, settings: SettingsParam
) -> dg.AssetCheckResult:
    # This environment's membership_changes (a later environment's key carries its name).
    key = EnvironmentNames.of(settings).key("membership_changes")
    event = context.instance.get_latest_materialization_event(key)
    held = list(event.asset_materialization.metadata["held_batches"].value) if event else []
    return dg.AssetCheckResult(
        passed=not held,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "held_batches": held,
            "to_release": dg.MetadataValue.md(release_instructions(held)),
        },
    )


@dg.asset(
    key="published_membership_events",
    deps=[membership_changes],
    group_name="membership",
    kinds={"sqlite"},
    description=(
        "The outbox drained into the membership store (events, current membership, held batches) "
        "with one delivery per event and matching workflow trigger (no backfill, trigger "
        "frequency, trigger conditions). Idempotent: publishing twice changes nothing."
    ),
)
def published_membership_events(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    store: MembershipStoreResource,
    settings: SettingsParam,
) -> dg.MaterializeResult:
    try:
        setup = load_workflow_setup(settings)
    except DefinitionError as error:
        raise dg.Failure(
            description="workflow triggers with errors; this evaluation's membership events wait "
            "in the outbox, and the next run after the fix publishes them:\n" + str(error)
        ) from None
    with warehouse.connect() as connection:
        evaluated_at = members_evaluated_at(connection)
        if is_earlier_evaluation(connection):  # no trigger is queued at an earlier time
            context.log.warning(
                f"members evaluated at {format_time(evaluated_at)}, earlier than the last "
                "recorded evaluation: nothing published, no workflow triggered"
            )
            return dg.MaterializeResult(
                metadata={
                    "events_published": 0,
                    "deliveries_created": 0,
                    "skipped": "an evaluation earlier than the last recorded",
                }
            )
        opened = store.open()
        report = publish_outbox(
            connection, opened, setup.triggers, setup.default_sink, evaluated_at
        )
        static = process_static_triggers(
            connection, opened, setup.triggers, setup.default_sink, evaluated_at
        )
        # Which audiences the API's real time may now evaluate, and at which version.
        plan = publish_plan(opened, connection)
    return dg.MaterializeResult(
        metadata={
            "events_published": report.events,
            "deliveries_created": report.deliveries,
            "static_events_triggered": static.events,
            "static_deliveries_created": static.deliveries,
            "deliveries_held": report.held_deliveries,
            "skipped_by_trigger_frequency": report.skipped_by_frequency,
            "skipped_by_trigger_conditions": report.skipped_by_conditions,
            "realtime_audiences_published": len(plan),
        }
    )


@dg.asset(
    key="workflow_trigger_deliveries",
    deps=[published_membership_events],
    group_name="membership",
    kinds={"python"},
    description=(
        "One delivery pass: due workflow triggers sent to their sinks (a JSON-lines file, a signed "
        "webhook, or Knock's workflow trigger API) at least once, with the delivery id as "
        "idempotency key. Failures are retried later with back-off (never blocking evaluation); "
        "after too many attempts a delivery is dead-lettered (`audiences deliveries`, "
        "`audiences replay`). Runs after each evaluation, and when the `deliveries_due` sensor "
        "sees deliveries due; each delivery is claimed before it is sent, so passes that overlap "
        "(or `audiences deliver --watch`) never send it twice."
    ),
)
def workflow_trigger_deliveries(
    context: dg.AssetExecutionContext, store: MembershipStoreResource, settings: SettingsParam
) -> dg.MaterializeResult:
    from audiences.delivery.loop import deliver_due, delivery_status
    from audiences.delivery.sinks import close_sinks, load_sinks

    # The sinks only: deliveries already queued are sent even while a trigger file has errors.
    sinks, _ = load_sinks(settings.sinks_file)
    opened = store.open()
    try:
        report = deliver_due(
            opened, sinks, limit=PASS_LIMIT, seconds_per_sink=PASS_SECONDS_PER_SINK
        )
        status = delivery_status(opened)
    finally:
        close_sinks(sinks)
    if report.dead:
        context.log.warning(
            f"{report.dead} deliveries were dead-lettered; see `audiences deliveries`"
        )
    return dg.MaterializeResult(
        metadata={
            "delivered": report.delivered,
            "retried_later": report.retried,
            "dead_lettered": report.dead,
            "waiting_for_unknown_sink": report.skipped_unknown_sink,
            "status_per_sink": dg.MetadataValue.json(status),
        }
    )


def change_note(change: AudienceChanges) -> str:
    """What a person reading an audience's row of a run's changes should know: its events are
    held (and by which batch), or they are its first evaluation's backfill."""
    if change.held_batch:
        return "held: " + change.held_batch
    return "first evaluation (backfill)" if change.is_backfill else ""


def release_instructions(batches: list[str]) -> str:
    """What a person runs for each held batch (Markdown): release its events, or discard them."""
    if not batches:
        return "No batch is held."
    return "\n".join(
        f"- batch `{batch}`: `audiences release {batch}` delivers its events, "
        f"`audiences discard {batch}` drops them"
        for batch in batches
    )
