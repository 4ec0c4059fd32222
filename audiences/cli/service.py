"""The HTTP API and its keys: `serve`, `keys`."""

from __future__ import annotations

import json
import os

from audiences.cli.common import port_number
from audiences.settings import Settings


def serve(settings: Settings, arguments) -> int:
    """Serve the API (Knock's audiences and users endpoints, checks, guides, broadcasts, Census)
    under uvicorn. The OpenAPI document is at /openapi.json, its pages at /docs.
    Clients send a key from `audiences keys create` as `Authorization: Bearer <key>`. Beside the
    API, a worker process (`api/workers.py`), started, restarted if it dies and stopped with the
    service, evaluates identified users at once (real time) and, unless --no-deliver, delivers
    every served environment's workflow triggers as they are queued (the worker of `audiences
    deliver --watch`); SIGTERM stops both cleanly."""
    import signal

    import uvicorn

    from audiences.api.app import asgi_app
    from audiences.api.protocol import PROTOCOL

    options = {"host": arguments.host, "port": arguments.port, "log_level": "info"}
    options.update(access_log=False, http=PROTOCOL)
    from audiences.api.workers import ADDRESS_VARIABLE, WorkerSupervisor

    supervisor = None
    if arguments.deliver or settings.realtime:
        # Real time and delivery in a process of their own, which the API's writes wake.
        supervisor = WorkerSupervisor(
            settings, deliver=arguments.deliver, poll_seconds=arguments.poll_seconds
        )
    address = supervisor.address if supervisor else None
    if arguments.workers > 1:
        from audiences.api.app import close_app, create_app

        close_app(create_app(settings, address))  # a misconfigured environment stops here
        # Each worker process builds the app from these settings, passed as environment variables.
        os.environ.update(settings.environment_variables())
        if address:
            os.environ[ADDRESS_VARIABLE] = address
        app, options = "audiences.api.app:asgi_app", {**options, "factory": True}
        options["workers"] = arguments.workers
    else:
        app = asgi_app(settings, address)
    if supervisor:
        supervisor.start()
    # uvicorn handles SIGTERM and Ctrl-C itself (a graceful shutdown), then raises the signal again
    # under the handlers it found: these ones let the worker process stop cleanly after it.
    previous = {
        number: signal.signal(number, lambda *_: None) for number in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        uvicorn.run(app, **options)
    finally:
        if supervisor:
            supervisor.stop()
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 0


def keys(settings: Settings, arguments) -> int:
    """Secret keys of the API, one set per environment, stored hashed in that environment's store.
    `create` prints the key once; `list` shows ids and names; `revoke <key_id>` ends a key."""
    from audiences.api.keys import bind_store, create_key, list_keys, revoke_key
    from audiences.store.database import MembershipStore

    def environment_store(environment: str) -> MembershipStore:
        # The store `audiences serve` uses for this environment, whatever AUDIENCES_ENV is.
        store = MembershipStore(settings.store_url_for(environment)).create()
        bind_store(store, environment)
        return store

    environments = [arguments.environment] if arguments.environment else settings.api_environments
    if arguments.action == "create" and arguments.service_token:
        from audiences.api.management import create_service_token

        first = settings.development_environment
        key_id, secret = create_service_token(environment_store(first), arguments.name)
        print(
            f"created service token {key_id} ({arguments.name!r}, every environment); it is shown only now:"
        )
        print(secret)
        return 0
    if arguments.action == "create":
        environment = arguments.environment or settings.environment
        if environment not in settings.api_environments:
            raise ValueError(
                f"unknown environment {environment!r}; the API serves "
                f"{', '.join(settings.api_environments)} (AUDIENCES_API_ENVIRONMENTS)"
            )
        key, secret = create_key(environment_store(environment), environment, arguments.name)
        print(f"created key {key.key_id} ({environment}, {key.name!r}); it is shown only now:")
        print(secret)
        return 0
    if arguments.action == "list":
        for environment in environments:
            for row in list_keys(environment_store(environment)):
                print(json.dumps(row))
        return 0
    if not arguments.key_id:
        raise ValueError("give the key id to revoke (see `audiences keys list`)")
    for environment in environments:
        if revoke_key(environment_store(environment), arguments.key_id):
            print(f"revoked key {arguments.key_id} ({environment})")
            return 0
    raise ValueError(f"no live key {arguments.key_id!r}")


def register(command) -> None:
    """Add this group's commands to the parser (`command` makes one subcommand)."""
    sub = command("serve", serve, "run the Knock-compatible HTTP API")
    sub.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)"
    )
    sub.add_argument("--port", type=port_number, default=8800, help="the port (default 8800)")
    sub.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (default 1; 2 on a 2-core machine serves about twice the writes)",
    )
    sub.add_argument(
        "--no-deliver",
        dest="deliver",
        action="store_false",
        help="do not deliver workflow triggers in this service (run `audiences deliver --watch`)",
    )
    sub.add_argument(
        "--poll-seconds",
        type=float,
        default=None,
        help="how often the delivery worker looks for deliveries queued by other processes "
        "(default 0.2 s on SQLite, 2 s on PostgreSQL, where NOTIFY wakes it)",
    )
    sub = command("keys", keys, "create, list and revoke the API's secret keys")
    sub.add_argument("action", choices=["create", "list", "revoke"])
    sub.add_argument("key_id", nargs="?", help="the key to revoke (see `audiences keys list`)")
    sub.add_argument("--name", default="default", help="a name to recognize the key by")
    sub.add_argument(
        "--service-token",
        action="store_true",
        help="a service token for Knock's CLI (the management API), valid in every environment",
    )
