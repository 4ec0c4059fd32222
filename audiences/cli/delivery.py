"""Workflow triggers on their way to sinks: `deliveries`, `release`, `discard`, `replay`, `deliver`, `broadcast`, `backfill`."""

from __future__ import annotations

import json

from audiences.cli.common import open_store, read_warehouse
from audiences.settings import Settings


def deliveries(settings: Settings, arguments) -> int:
    """Show delivery status per sink (pending, delivered, dead, held, discarded), the dead-letter
    list, and batches of events held by the circuit breaker."""
    from audiences.delivery.loop import delivery_status
    from audiences.store.queries import dead_letters, held_batches

    store = open_store(settings)
    status = delivery_status(store)
    print(json.dumps(status, indent=2, default=str))
    for letter in dead_letters(store):
        print(
            f"dead  {letter['delivery_id']}  {letter['workflow_key']}  {letter['user_id']}  "
            f"attempts={letter['attempts']}  {letter['last_error']}"
        )
    for batch in held_batches(store):
        print(
            f"held  {batch['batch_id']}  {batch['audience_key']}  at {batch['evaluated_at']}: "
            f"{batch['entered']} entered, {batch['exited']} exited of {batch['audience_size']}"
        )
    return 0


def release(settings: Settings, arguments) -> int:
    """Release a batch held by the circuit breaker: its deliveries are queued for sending."""
    from audiences.workflows.publish import release_batch

    print(
        f"released {release_batch(open_store(settings), arguments.batch)} deliveries of {arguments.batch}"
    )
    return 0


def discard(settings: Settings, arguments) -> int:
    """Discard a batch held by the circuit breaker: its events stay recorded, nothing is sent."""
    from audiences.workflows.publish import discard_batch

    print(
        f"discarded {discard_batch(open_store(settings), arguments.batch)} deliveries of {arguments.batch}"
    )
    return 0


def replay(settings: Settings, arguments) -> int:
    """Queue dead-lettered deliveries again (with fresh attempts); they keep their idempotency keys."""
    from audiences.delivery.loop import replay as replay_deliveries

    if not arguments.delivery_ids and not arguments.all_dead:
        raise ValueError("name delivery ids or use --all-dead")
    count = replay_deliveries(
        open_store(settings),
        delivery_ids=arguments.delivery_ids or None,
        all_dead=arguments.all_dead,
    )
    print(f"queued {count} deliveries again")
    return 0


def deliver(settings: Settings, arguments) -> int:
    """Send due workflow triggers to their sinks, at least once, with retries and back-off; with
    --watch, keep delivering until SIGTERM or Ctrl-C, each trigger as soon as it is queued. Several
    workers may run at once: each delivery is claimed by one of them for a lease (--lease-seconds)
    before it is sent."""
    from audiences.delivery.loop import deliver_due
    from audiences.delivery.sinks import load_sinks

    sinks, _ = load_sinks(settings.sinks_file)
    store = open_store(settings)
    options = {} if arguments.max_attempts is None else {"max_attempts": arguments.max_attempts}
    if arguments.lease_seconds is not None:
        options["lease_seconds"] = arguments.lease_seconds
    if arguments.watch:
        from audiences.delivery.worker import DeliveryWorker

        worker = DeliveryWorker(store, sinks, poll_seconds=arguments.poll_seconds, **options)
        until_signalled(worker.start)
        print(worker.stop())
        return 0
    report = deliver_due(store, sinks, **options)
    print(report)
    return 0


def start_delivery_workers(
    settings: Settings, environments: list[str], poll_seconds: float | None = None, **options
) -> list:
    """An always-on delivery worker (`delivery/worker.py`) for each environment, started: each
    delivers from its environment's store to that environment's sinks (`options`: the worker's,
    such as `worker_id`)."""
    from audiences.delivery.sinks import load_sinks
    from audiences.delivery.worker import DeliveryWorker
    from audiences.store.database import MembershipStore

    workers = []
    try:
        for environment in environments:
            own = settings.for_environment(environment)
            sinks, _ = load_sinks(own.sinks_file)
            store = MembershipStore(own.store_url).create()
            workers.append(
                DeliveryWorker(store, sinks, poll_seconds=poll_seconds, **options).start()
            )
    except BaseException:
        stop_delivery_workers(workers)
        raise
    return workers


def stop_delivery_workers(workers: list) -> None:
    """Stop the workers (each finishes and records its sends in flight) and close their stores."""
    for worker in workers:
        worker.stop()
        worker.store.dispose()


def until_signalled(start) -> None:
    """Call `start()`, then wait until SIGTERM or SIGINT (Ctrl-C); the previous handlers are put
    back before returning."""
    import signal
    import threading

    stopping = threading.Event()
    previous = {
        number: signal.signal(number, lambda *_: stopping.set())
        for number in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        start()
        while not stopping.wait(1.0):
            pass
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def broadcast(settings: Settings, arguments) -> int:
    """Trigger a workflow once per member of an audience (one per user and tenant pair), through
    the same sinks and delivery guarantees; the same broadcast never sends twice."""
    from audiences.delivery.sinks import load_sinks
    from audiences.workflows.broadcasts import broadcast as send_broadcast

    try:
        data = json.loads(arguments.data)
    except json.JSONDecodeError as error:
        raise ValueError(f"--data is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError("--data must be a JSON object")
    sinks, default_sink = load_sinks(settings.sinks_file)
    sink = arguments.sink or default_sink
    if sink not in sinks:
        raise ValueError(f"unknown sink {sink!r}; sinks: {', '.join(sorted(sinks))}")
    result = send_broadcast(
        open_store(settings),
        arguments.audience,
        arguments.workflow,
        sink,
        data,
        arguments.tenant,
        arguments.id,
    )
    print(
        f"broadcast {result.broadcast_id}: {result.recipients} recipients, {result.new_deliveries} new "
        f"deliveries queued (run `audiences deliver`)"
    )
    return 0


def backfill(settings: Settings, arguments) -> int:
    """Trigger a workflow once for every current member of its audience, who joined before the
    trigger existed (Knock never backfills; this is the explicit way). Running it twice sends
    nothing twice."""
    from audiences.delivery.setup import load_workflow_setup
    from audiences.workflows.broadcasts import broadcast as send_broadcast

    setup = load_workflow_setup(settings)
    trigger = setup.triggers.get(arguments.workflow)
    if trigger is None:
        raise ValueError(f"no workflow trigger {arguments.workflow!r} in {settings.workflows_dir}")
    if trigger.on != "entered":
        raise ValueError(
            f"{trigger.workflow_key!r} triggers on exit; a backfill sends entry triggers only"
        )
    result = send_broadcast(
        open_store(settings),
        trigger.audience_key,
        trigger.workflow_key,
        trigger.sink or setup.default_sink,
        {**trigger.data, "event": "backfill"},
        broadcast_id=f"backfill:{trigger.workflow_key}",
    )
    print(
        f"backfill of {trigger.workflow_key}: {result.recipients} members, {result.new_deliveries} new "
        f"deliveries queued (run `audiences deliver`)"
    )
    return 0


def backfill_entries(settings: Settings, arguments) -> int:
    """Send the `entered` triggers that an audience's first members never got (a new audience's
    first evaluation triggers nothing): each backfilled member once per `entered` trigger, under
    the id that entry's delivery would have had, so running it again sends nothing twice. With
    --dry-run, print what it would send and change nothing."""
    from datetime import UTC, datetime

    from audiences.delivery.setup import load_workflow_setup
    from audiences.workflows.entry_backfill import backfill_entries as run_backfill

    setup = load_workflow_setup(settings)
    with read_warehouse(settings) as connection:
        result = run_backfill(
            connection,
            open_store(settings),
            setup.triggers,
            setup.default_sink,
            arguments.audience,
            datetime.now(UTC),
            dry_run=arguments.dry_run,
        )
    for delivery in result.deliveries if arguments.dry_run else []:
        print(
            json.dumps(
                {
                    key: delivery[key]
                    for key in ("delivery_id", "workflow_key", "sink", "user_id", "tenant")
                }
                | {"payload": json.loads(delivery["payload"])},
                ensure_ascii=False,
            )
        )
    verb = "would queue" if arguments.dry_run else "queued"
    print(
        f"entry backfill of {result.audience_key} ({', '.join(result.workflows)}): "
        f"{result.members} backfilled members, {verb} {result.new_deliveries} new deliveries "
        f"({len(result.deliveries) - result.new_deliveries} sent before, "
        f"{result.skipped_by_conditions} skipped by trigger conditions, "
        f"{result.skipped_by_frequency} by frequency)"
        + ("" if arguments.dry_run else "; run `audiences deliver`")
    )
    return 0


def register(command) -> None:
    """Add this group's commands to the parser (`command` makes one subcommand)."""
    command("deliveries", deliveries, "delivery status per sink, dead letters and held batches")
    sub = command("release", release, "send a held batch of membership events")
    sub.add_argument("batch", help="the held batch id (see `audiences deliveries`)")
    sub = command("discard", discard, "never send a held batch of membership events")
    sub.add_argument("batch", help="the held batch id (see `audiences deliveries`)")
    sub = command("replay", replay, "send dead-lettered deliveries again")
    sub.add_argument("delivery_ids", nargs="*", help="delivery ids (see `audiences deliveries`)")
    sub.add_argument("--all-dead", action="store_true", help="every dead-lettered delivery")
    sub = command("deliver", deliver, "send due workflow triggers to their sinks")
    sub.add_argument(
        "--watch", action="store_true", help="keep delivering as new triggers arrive (Ctrl-C stops)"
    )
    sub.add_argument(
        "--max-attempts",
        type=int,
        default=None,
        help="attempts before a retried delivery is dead-lettered (default: the engine's, about "
        "half an hour of back-off)",
    )
    sub.add_argument(
        "--lease-seconds",
        type=float,
        default=None,
        help="how long this worker's claim on deliveries lasts (renewed while it works) before "
        "another worker may take them over: how long a dead worker's deliveries wait",
    )
    sub.add_argument(
        "--poll-seconds",
        type=float,
        default=None,
        help="with --watch, how often an idle worker looks for deliveries queued by other "
        "processes (default 0.2 s on SQLite, 2 s on PostgreSQL, where NOTIFY wakes it)",
    )
    sub = command("broadcast", broadcast, "trigger a workflow once per member of an audience")
    sub.add_argument("audience", help="the audience key")
    sub.add_argument("--workflow", required=True, help="the workflow key to trigger")
    sub.add_argument("--data", default="{}", help="JSON object added to each trigger's data")
    sub.add_argument("--tenant", help="only members with this tenant")
    sub.add_argument("--sink", help="the sink (default: the sinks file's default)")
    sub.add_argument("--id", help="an explicit broadcast id (the same id never sends twice)")
    sub = command("backfill", backfill, "trigger a workflow for its audience's existing members")
    sub.add_argument("workflow", help="the workflow key (a folder of the workflows folder)")
    sub = command(
        "backfill-entries",
        backfill_entries,
        "send the entry triggers an audience's first (backfilled) members never got, once",
    )
    sub.add_argument("audience", help="the audience key")
    sub.add_argument(
        "--dry-run", action="store_true", help="print what would be sent; change nothing"
    )
