"""`audiences`: the command-line tool.

Every command reads its locations from `AUDIENCES_*` environment variables (see
`audiences.settings`), or from `.env` in the working folder, and the global flags (before or after
the command) override them, so the tool can be pointed at anyone's users and definitions. Exit
codes: 0 success, 1 the thing asked about is invalid or missing (bad definitions, unknown audience
or user, a failed run), 2 bad usage, 130 interrupted. Errors are one line each; --debug adds the
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from audiences.settings import ENVIRONMENT_VARIABLES, Settings, dotenv_variables, format_time


def main(argv: list[str] | None = None) -> int:
    """The `audiences` entry point. Settings come from flags, then the environment, then `.env` in
    the working folder. An error is printed as one line (or one per problem) naming the file, field
    or flag, with exit status 1; `--debug` adds the traceback."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    if not getattr(arguments, "handler", None):
        parser.print_help()
        return 2
    settings = None
    try:
        with dotenv_variables() as from_dotenv:
            arguments.from_dotenv = set(from_dotenv)
            settings = Settings.from_env(
                duckdb_path=arguments.duckdb,
                definitions_dir=arguments.definitions,
                sources_file=arguments.sources,
                users_source=arguments.users_source,
                source_mode=arguments.source_mode,
                evaluation_time=arguments.evaluation_time,
                dbt_project_dir=arguments.dbt_project,
                workflows_dir=arguments.workflows,
                sinks_file=arguments.sinks,
                store_url=arguments.store,
            )
            _require_named_files(arguments)
            return arguments.handler(settings, arguments) or 0
    except BrokenPipeError:  # the reader (e.g. `head`) has what it wanted
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        if arguments.debug:
            traceback.print_exc()
        print(f"error: {_user_message(error, settings)}", file=sys.stderr)
        return 1


def _require_named_files(arguments) -> None:
    """A sinks file or workflows folder named by a flag must exist: without one, the engine would
    quietly fall back to its default (a JSON-lines file, no triggers), which a typo should not do."""
    for flag, value in (("--sinks", arguments.sinks), ("--workflows", arguments.workflows)):
        if value and not Path(value).expanduser().exists():
            raise FileNotFoundError(f"{flag} {value}: no such file or folder")


def _user_message(error: BaseException, settings: Settings | None) -> str:
    """What the user needs from an error: the message of the first error in its chain that is about
    their input (a wrapper such as Dagster's names only itself); anything else is a bug, shown as
    its type and message with a pointer to --debug."""
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    store = (
        f"the membership store {settings.store_url!r} (--store, AUDIENCES_STORE_URL)"
        if settings
        else "the membership store"
    )
    chain, seen = error, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OperationalError):
            return f"{store} cannot be used: {getattr(chain, 'orig', chain)}"
        if isinstance(chain, (ArgumentError, NoSuchModuleError)):
            return f"{store} is not a usable database URL: {chain}"
        if isinstance(chain, ModuleNotFoundError) and chain.name == "psycopg":
            return f'{store} needs PostgreSQL\'s driver: pip install -e ".[postgres]"'
        if isinstance(chain, _EXPECTED_ERRORS()):
            return str(chain)
        chain = chain.__cause__
    return f"{type(error).__name__}: {error} (unexpected; run again with --debug for the traceback)"


def _EXPECTED_ERRORS():
    from audiences.conditions.definitions import DefinitionError
    from audiences.users.sources import SourceError
    from audiences.warehouse.queries import WarehouseError

    # MembershipError, UploadError and the sinks' errors are ValueErrors too; OSError covers a
    # missing, unreadable or unwritable file named by the user.
    return (DefinitionError, SourceError, WarehouseError, ValueError, OSError)


TIME_FORMAT = "ISO 8601, e.g. 2026-11-01T12:00:00Z or 2026-11-01"


def _time_flag(value: str):
    """An ISO 8601 time given to a flag (UTC when it has no offset); argparse names the flag."""
    from audiences.settings import parse_evaluation_time

    try:
        return parse_evaluation_time(value) if value.strip() else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a time ({TIME_FORMAT})") from None


def _port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0-65535)")
    return int(value)


def _global_options(parser: argparse.ArgumentParser, after_command: bool = False) -> None:
    """The options every command takes, before or after its name. After it, they default to
    "not given" (argparse.SUPPRESS), so they do not undo the same option given before it."""
    group = (
        parser.add_argument_group("global options (also accepted before the command)")
        if after_command
        else parser
    )
    default = {"default": argparse.SUPPRESS} if after_command else {}
    group.add_argument("--duckdb", help="the DuckDB warehouse file (AUDIENCES_DUCKDB)", **default)
    group.add_argument(
        "--definitions", help="the audience definitions folder (AUDIENCES_DEFINITIONS)", **default
    )
    group.add_argument("--sources", help="the sources YAML file (AUDIENCES_SOURCES)", **default)
    group.add_argument(
        "--users-source",
        help="one users source: a file, Parquet folder or URI (AUDIENCES_USERS_SOURCE)",
        **default,
    )
    group.add_argument(
        "--source-mode", choices=["snapshot", "stream"], help="mode of --users-source", **default
    )
    group.add_argument(
        "--evaluation-time",
        type=_time_flag,
        metavar="TIME",
        help=f"the evaluation time, {TIME_FORMAT} (AUDIENCES_EVALUATION_TIME); default: now, and "
        "for explain the last evaluation's",
        **default,
    )
    group.add_argument(
        "--dbt-project", help="the dbt project folder (AUDIENCES_DBT_PROJECT)", **default
    )
    group.add_argument(
        "--workflows", help="the workflow triggers folder (AUDIENCES_WORKFLOWS)", **default
    )
    group.add_argument("--sinks", help="the sinks YAML file (AUDIENCES_SINKS)", **default)
    group.add_argument("--store", help="the membership store URL (AUDIENCES_STORE_URL)", **default)
    group.add_argument(
        "--debug", action="store_true", help="show the traceback of an error", **default
    )


class _Parser(argparse.ArgumentParser):
    """Usage errors in two lines, the option and what was wrong, rather than the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")


def _parser() -> argparse.ArgumentParser:
    variables = "\n".join(
        f"  {name:27} {meaning}" for name, meaning in ENVIRONMENT_VARIABLES.items()
    )
    parser = _Parser(
        prog="audiences",
        description="A warehouse-native, Knock-compatible audiences engine (Dagster, DuckDB, dbt).",
        epilog=f"Environment variables (flags override them):\n{variables}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=handler.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _global_options(sub, after_command=True)
        sub.set_defaults(handler=handler)
        return sub

    sub = command(
        "init",
        init,
        "make a project folder: definitions, sources, sinks, a dbt project, dagster_home",
    )
    sub.add_argument(
        "folder", nargs="?", default=".", help="the folder (default: the working folder)"
    )
    sub = command("run", run, "load users and materialize every audience through Dagster")
    sub.add_argument("--verbose", action="store_true", help="show Dagster's and dbt's full log")
    sub.add_argument(
        "--allow-earlier",
        action="store_true",
        help="evaluate at a time earlier than the last recorded evaluation, recording the "
        "members but no membership events or workflow triggers",
    )
    sub = command(
        "preview", preview, "count and sample the users matching an audience, writing nothing"
    )
    sub.add_argument("audience", help="an audience key, or the path of an audience.json file")
    sub.add_argument(
        "--sample", type=int, default=10, help="how many matching users to show (default 10)"
    )
    sub.add_argument("--sql", action="store_true", help="also print the SQL that was run")
    sub = command("members", members, "list an audience's members as JSON lines")
    sub.add_argument("audience", help="the audience key")
    sub.add_argument(
        "--at",
        type=_time_flag,
        metavar="TIME",
        help=f"who was a member at this time, {TIME_FORMAT} (from the membership history)",
    )
    command("validate", validate, "validate every audience definition")
    sub = command("explain", explain, "show why a user is in or out of an audience")
    sub.add_argument("audience", help="an audience key, or the path of an audience.json file")
    sub.add_argument("user_id", help="the user's id")
    sub = command("generate", generate, "regenerate the dbt models from the definitions")
    sub.add_argument(
        "--check", action="store_true", help="fail if the committed models are out of date"
    )
    sub = command("events", events, "list membership events as JSON lines")
    sub.add_argument("--audience", help="only this audience")
    sub.add_argument("--user", help="only this user id")
    sub.add_argument("--type", choices=["entered", "exited"], help="only entered or exited")
    sub.add_argument(
        "--since",
        type=_time_flag,
        metavar="TIME",
        help=f"events at or after this time ({TIME_FORMAT})",
    )
    sub.add_argument(
        "--until", type=_time_flag, metavar="TIME", help=f"events before this time ({TIME_FORMAT})"
    )
    sub.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
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
        "--max-attempts", type=int, default=8, help="attempts before a delivery is dead-lettered"
    )
    sub.add_argument(
        "--lease-seconds",
        type=float,
        default=None,
        help="how long this worker's claim on deliveries lasts (renewed while it works) before "
        "another worker may take them over: how long a dead worker's deliveries wait",
    )
    sub = command("broadcast", broadcast, "trigger a workflow once per member of an audience")
    sub.add_argument("audience", help="the audience key")
    sub.add_argument("--workflow", required=True, help="the workflow key to trigger")
    sub.add_argument("--data", default="{}", help="JSON object added to each trigger's data")
    sub.add_argument("--tenant", help="only members with this tenant")
    sub.add_argument("--sink", help="the sink (default: the sinks file's default)")
    sub.add_argument("--id", help="an explicit broadcast id (the same id never sends twice)")
    command(
        "publish", publish, "publish the warehouse's unpublished membership events to the store"
    )
    for name, handler, text in (
        ("add", add, "add a member to a static audience"),
        ("remove", remove, "remove a member from a static audience"),
        ("check", check, "is this user a member (tenant-strict)?"),
    ):
        sub = command(name, handler, text)
        sub.add_argument("audience", help="the audience key")
        sub.add_argument("user_id", help="the user's id")
        sub.add_argument("--tenant", help="the tenant (none: the membership without tenant)")
    sub = command("upload", upload, "upload a CSV file of users into a static audience")
    sub.add_argument("audience", help="the static audience key")
    sub.add_argument(
        "file", help="the CSV file (at most 10 MB unless AUDIENCES_UPLOAD_MAX_BYTES says otherwise)"
    )
    sub.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="COLUMN=FIELD",
        help="map a column to a user field or custom property (dots nest); repeatable",
    )
    sub.add_argument("--tenant-column", help="the column that holds each membership's tenant")
    sub.add_argument("--rejects", help="where to write rejected rows (default: <file>.rejects.csv)")
    sub = command("sync", sync, "run the warehouse syncs that feed static audiences")
    sub.add_argument(
        "names", nargs="*", help="only these syncs (default: every sync in the syncs file)"
    )
    sub = command("eligible", eligible, "is this user eligible for a guide?")
    sub.add_argument("guide", help="the guide key (a folder of the guides folder)")
    sub.add_argument("user_id", help="the user's id")
    sub.add_argument("--tenant", help="the request's tenant")
    sub = command("backfill", backfill, "trigger a workflow for its audience's existing members")
    sub.add_argument("workflow", help="the workflow key (a folder of the workflows folder)")
    sub = command("serve", serve, "run the Knock-compatible HTTP API")
    sub.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)"
    )
    sub.add_argument("--port", type=_port, default=8800, help="the port (default 8800)")
    sub.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (default 1; 2 on a 2-core machine serves about twice the writes)",
    )
    sub = command("keys", keys, "create, list and revoke the API's secret keys")
    sub.add_argument("action", choices=["create", "list", "revoke"])
    sub.add_argument("key_id", nargs="?", help="the key to revoke (see `audiences keys list`)")
    sub.add_argument(
        "--environment",
        default=None,
        help="the key's environment (default AUDIENCES_ENV); each has its own store",
    )
    sub.add_argument("--name", default="default", help="a name to recognize the key by")
    return parser


def serve(settings: Settings, arguments) -> int:
    """Serve the API (Knock's audiences and users endpoints, checks, guides, broadcasts, Census)
    under uvicorn, one process. The OpenAPI document is at /openapi.json, its pages at /docs.
    Clients send a key from `audiences keys create` as `Authorization: Bearer <key>`."""
    import uvicorn

    from audiences.api.app import asgi_app

    if arguments.workers > 1:
        from audiences.api.app import close_app, create_app

        close_app(create_app(settings))  # a misconfigured environment stops here, with its message
        # Each worker process builds the app from these settings, passed as environment variables.
        os.environ.update(settings.environment_variables())
        uvicorn.run(
            "audiences.api.app:asgi_app",
            factory=True,
            workers=arguments.workers,
            host=arguments.host,
            port=arguments.port,
            log_level="info",
            access_log=False,
        )
    else:
        uvicorn.run(
            asgi_app(settings),
            host=arguments.host,
            port=arguments.port,
            log_level="info",
            access_log=False,
        )
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


def init(settings: Settings, arguments) -> int:
    """Make FOLDER a project of your own, with the layout every setting defaults to: definitions in
    data/audiences/ (an example when there are none), users in data/sources.yml, workflow triggers
    in data/workflows/, sinks in data/sinks.yml, the dbt project in dbt_project/ (the engine's,
    without its sample audiences, its models generated from your definitions) and Dagster's
    instance in dagster_home/. Files that exist are kept. With --definitions, the models are
    generated from that folder instead, and no example is written. Run every other command from
    FOLDER: nothing it does writes into the engine."""
    from audiences.scaffold import init_project

    definitions = settings.definitions_dir if arguments.definitions else None
    report = init_project(Path(arguments.folder), definitions)
    folder = report.folder
    print(
        f"{folder}: {len(report.created)} files created, {len(report.kept)} kept, "
        f"{len(report.generated)} dbt model files generated from {definitions or folder / 'data' / 'audiences'}"
    )
    for path in report.kept:
        print(f"  kept {os.path.relpath(path, folder)}")
    flag = f" --definitions {arguments.definitions}" if arguments.definitions else ""
    print(
        f"next: cd {folder} && audiences{flag} run     (the Dagster UI: DAGSTER_HOME=$PWD/dagster_home dagster dev)"
    )
    return 0


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
    from audiences.delivery.sinks import load_sinks
    from audiences.settings import require_dbt_project
    from audiences.warehouse.lock import hold_writer_lock

    require_dbt_project(settings.dbt_project_dir)  # before Dagster loads it, with a plain message
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
    with _environment(settings.environment_variables()):
        outcome = _execute_main_job(
            evaluated_at,
            settings.dagster_home,
            verbose=arguments.verbose,
            debug=arguments.debug,
            allow_earlier=arguments.allow_earlier,
        )
    for warning in outcome.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not outcome.success:
        for failure in outcome.failures or [
            "the run failed (--verbose shows Dagster's and dbt's log)"
        ]:
            print(f"error: {failure}", file=sys.stderr)
        return 1
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


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """These settings as environment variables for Dagster and dbt, for the duration of a run only."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
) -> _RunOutcome:
    import dagster as dg

    from audiences.settings import prepare_dagster_home
    from pipelines import build_definitions
    from pipelines.defs.schedules import MAIN_JOB

    defs = build_definitions()
    job = defs.resolve_job_def(MAIN_JOB)
    # Without --verbose, Dagster's console stays quiet: its warnings and failures are read back from
    # the run's event log and printed as the user's messages, not as Dagster's tracebacks.
    run_config = {
        "ops": {
            "audience_models": {
                "config": {
                    "evaluation_time": format_time(evaluated_at),
                    "allow_earlier": allow_earlier,
                }
            }
        },
        "loggers": {"console": {"config": {"log_level": "DEBUG" if verbose else "CRITICAL"}}},
    }
    tags = {"audiences/launched_by": "audiences run"}
    # The instance `dg dev` shows, so that the run appears in its runs list.
    with dg.DagsterInstance.from_config(str(prepare_dagster_home(dagster_home))) as instance:
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
        found = result.asset_materializations_for_node(node) if result.success else []
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


def _step_error_message(error) -> str:
    """The user-facing message of a failed step: the error Dagster wrapped (an `Error occurred while
    executing op` names only Dagster), without its module path; a `dg.Failure`'s own description."""
    while error is not None and error.cls_name.startswith("Dagster") and error.cause is not None:
        error = error.cause
    if error is None:
        return "no error recorded"
    message = error.message.strip()
    qualified = message.split(":", 1)[0]
    if qualified.endswith(error.cls_name) and " " not in qualified:
        message = message.split(":", 1)[1].strip()
        user_error = error.cls_name in (
            "Failure",
            "SourceError",
            "DefinitionError",
            "WarehouseError",
            "ValueError",
            "FileNotFoundError",
            "SinkConfigError",
            "DbtCliRuntimeError",
            "DagsterDbtCliRuntimeError",
        )
        if not user_error:
            message = f"{error.cls_name}: {message} (unexpected; --debug shows the traceback)"
    return message


def _definition(settings: Settings, key_or_file: str):
    from audiences.conditions.definitions import (
        DefinitionError,
        Problem,
        load_definition_file,
        load_definition_set,
        references_to_skipped,
    )

    # Another audience's broken file does not matter here; this audience's errors (or those of an
    # audience it refers to) are the error.
    found = (
        load_definition_set(settings.definitions_dir) if settings.definitions_dir.is_dir() else None
    )
    definitions = found.definitions if found else {}
    path = Path(key_or_file)
    if path.suffix == ".json" or path.is_file():
        definition = load_definition_file(path)
        if found and (problems := references_to_skipped(definition, found.skipped)):
            raise DefinitionError(problems)
        return definition, {**definitions, definition.key: definition}
    if found is None:
        raise DefinitionError(
            [Problem(str(settings.definitions_dir), "$", f"no audience {key_or_file!r}")]
        )
    return found.require(key_or_file), definitions


def _chosen_time(settings: Settings, arguments, connection, default_to_last_evaluation: bool):
    """The time to evaluate at and where it came from: --evaluation-time, then
    AUDIENCES_EVALUATION_TIME, then the last evaluation's time (explain: what `members` shows) or
    now (preview: who matches now)."""
    from audiences.settings import utc_now
    from audiences.warehouse.evaluation import members_evaluated_at

    if arguments.evaluation_time is not None:
        return arguments.evaluation_time, "from --evaluation-time"
    if settings.evaluation_time is not None:
        where = (
            ".env"
            if "AUDIENCES_EVALUATION_TIME" in getattr(arguments, "from_dotenv", ())
            else "the environment"
        )
        return settings.evaluation_time, f"from AUDIENCES_EVALUATION_TIME in {where}"
    last = members_evaluated_at(connection)
    if default_to_last_evaluation:
        if last is not None:
            return (
                last,
                "the last evaluation's time, as `members` lists it; --evaluation-time picks another",
            )
        return utc_now(), "now: the warehouse has no evaluation yet"
    last_note = f"; the last evaluation was at {format_time(last)}" if last is not None else ""
    return utc_now(), f"now{last_note}; --evaluation-time picks another"


def preview(settings: Settings, arguments) -> int:
    """Count and sample the users that match an audience against the current warehouse, right now
    (or at --evaluation-time; the output says which, and when the last evaluation was). Nothing is
    written. The audience can be a key from the definitions folder or the path of an audience.json
    that is not committed yet."""
    from audiences.warehouse.queries import connect
    from audiences.warehouse.queries import preview as run_preview

    definition, definitions = _definition(settings, arguments.audience)
    with connect(settings.duckdb_path, read_only=True) as connection:
        now, source = _chosen_time(
            settings, arguments, connection, default_to_last_evaluation=False
        )
        result = run_preview(connection, definition, definitions, now, sample_size=arguments.sample)
    share = (
        f" ({result.count / result.total_users:.1%} of {result.total_users:,})"
        if result.total_users
        else ""
    )
    print(
        f"{definition.key}: {result.count:,} matching users{share} at {format_time(result.evaluated_at)} ({source})"
    )
    for row in result.sample:
        print("  " + json.dumps(row, ensure_ascii=False))
    if arguments.sql:
        print(result.sql)
    return 0


def members(settings: Settings, arguments) -> int:
    """Print an audience's members, one JSON object per line: {"user_id": ..., "tenant": ...}.
    A dynamic audience's are those of its last evaluation; a static audience's are read from the
    membership store, so adds and removes show at once. With --at, the members at that time, from
    the warehouse's history (static changes reach it at the next run)."""
    from audiences.conditions.definitions import DefinitionError
    from audiences.membership.changes import members_at
    from audiences.static.members import audience_types
    from audiences.store.queries import current_members
    from audiences.warehouse.queries import connect
    from audiences.warehouse.queries import members as list_members

    try:
        definitions = _definitions(settings)
    except DefinitionError:  # a broken file elsewhere must not hide the last evaluation
        definitions = {}
    defined = definitions.get(arguments.audience)
    if not arguments.at and (defined is None or defined.type == "static"):
        # Static, or not in the files (then maybe created in the store): ask the store, which a
        # dynamic audience's listing need not touch while a run writes to it.
        store = _store(settings)
        if audience_types(store, definitions).get(arguments.audience) == "static":
            for member in current_members(store, arguments.audience):
                sys.stdout.write(json.dumps(member, ensure_ascii=False) + "\n")
            return 0
    with connect(settings.duckdb_path, read_only=True) as connection:
        if arguments.at:
            rows = members_at(connection, arguments.audience, arguments.at)
        else:
            rows = list_members(connection, arguments.audience)
        for member in rows:
            sys.stdout.write(json.dumps(member, ensure_ascii=False) + "\n")
    return 0


def _store(settings: Settings):
    from audiences.store.database import MembershipStore

    return MembershipStore(settings.store_url).create()


def events(settings: Settings, arguments) -> int:
    """Print membership events from the store as JSON lines, oldest first, filtered by audience,
    user, type (entered / exited) and time."""
    from audiences.store.queries import list_events

    # The store keeps times as UTC ISO 8601 text in one format, so bounds are written the same way.
    since, until = (
        format_time(moment) if moment else None for moment in (arguments.since, arguments.until)
    )
    for event in list_events(
        _store(settings),
        arguments.audience,
        arguments.user,
        arguments.type,
        since,
        until,
        arguments.limit,
    ):
        sys.stdout.write(json.dumps(event, ensure_ascii=False) + "\n")
    return 0


def deliveries(settings: Settings, arguments) -> int:
    """Show delivery status per sink (pending, delivered, dead, held, discarded), the dead-letter
    list, and batches of events held by the circuit breaker."""
    from audiences.delivery.loop import delivery_status
    from audiences.store.queries import dead_letters, held_batches

    store = _store(settings)
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
    from audiences.membership.publish import release_batch

    print(
        f"released {release_batch(_store(settings), arguments.batch)} deliveries of {arguments.batch}"
    )
    return 0


def discard(settings: Settings, arguments) -> int:
    """Discard a batch held by the circuit breaker: its events stay recorded, nothing is sent."""
    from audiences.membership.publish import discard_batch

    print(
        f"discarded {discard_batch(_store(settings), arguments.batch)} deliveries of {arguments.batch}"
    )
    return 0


def replay(settings: Settings, arguments) -> int:
    """Queue dead-lettered deliveries again (with fresh attempts); they keep their idempotency keys."""
    from audiences.delivery.loop import replay as replay_deliveries

    if not arguments.delivery_ids and not arguments.all_dead:
        raise ValueError("name delivery ids or use --all-dead")
    count = replay_deliveries(
        _store(settings), delivery_ids=arguments.delivery_ids or None, all_dead=arguments.all_dead
    )
    print(f"queued {count} deliveries again")
    return 0


def deliver(settings: Settings, arguments) -> int:
    """Send due workflow triggers to their sinks, at least once, with retries and back-off; with
    --watch, keep going as new triggers arrive. Several workers may run at once: each delivery is
    claimed by one of them for a lease (--lease-seconds) before it is sent."""
    from audiences.delivery.loop import deliver_due, run_delivery_loop
    from audiences.delivery.sinks import load_sinks

    sinks, _ = load_sinks(settings.sinks_file)
    store = _store(settings)
    options = {"max_attempts": arguments.max_attempts}
    if arguments.lease_seconds is not None:
        options["lease_seconds"] = arguments.lease_seconds
    if arguments.watch:
        try:
            run_delivery_loop(store, sinks, **options)
        except KeyboardInterrupt:
            return 0
    report = deliver_due(store, sinks, **options)
    print(report)
    return 0


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
        _store(settings),
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


def _definitions(settings: Settings) -> dict:
    from audiences.conditions.definitions import load_definition_set

    # the usable ones: a broken definition file must not stop work on other audiences
    return (
        load_definition_set(settings.definitions_dir).definitions
        if settings.definitions_dir.is_dir()
        else {}
    )


def _audience_types(settings: Settings, store) -> dict[str, str]:
    from audiences.static.members import audience_types

    return audience_types(store, _definitions(settings))


def add(settings: Settings, arguments) -> int:
    """Add a user to a static audience (with --tenant, under that tenant). Adding an existing member
    changes nothing; a user not identified yet is kept as a missing user."""
    return _change(settings, arguments, "add")


def remove(settings: Settings, arguments) -> int:
    """Remove a user (the membership with --tenant, or the one without tenant) from a static
    audience. Removing a non-member changes nothing."""
    return _change(settings, arguments, "remove")


def _change(settings: Settings, arguments, action: str) -> int:
    from audiences.static.members import Member, change_members, require_static
    from audiences.users.profiles import get_profile

    store = _store(settings)
    require_static(arguments.audience, _audience_types(settings, store))
    result = change_members(
        store,
        arguments.audience,
        [Member(arguments.user_id, arguments.tenant)],
        action,
        source="manual",
    )
    tenant = f" with tenant {arguments.tenant!r}" if arguments.tenant else ""
    if not result.changed:
        relation = "already a member of" if action == "add" else "not a member of"
        print(f"no change: {arguments.user_id} {relation} {arguments.audience}{tenant}")
        return 0
    verb = {"add": "added to", "remove": "removed from"}[action]
    missing = action == "add" and get_profile(store, arguments.user_id) is None
    note = (
        " (no such user yet: kept as a missing user, and identifying them later triggers nothing)"
        if missing
        else ""
    )
    print(f"{arguments.user_id} {verb} {arguments.audience}{tenant}{note}")
    return 0


def check(settings: Settings, arguments) -> int:
    """Tenant-strict membership check: a member only when the membership's tenant equals --tenant
    (no --tenant: only a membership without tenant counts). Exit code 0 when a member, 1 when not."""
    from audiences.static.members import is_member

    store = _store(settings)
    if arguments.audience not in _audience_types(settings, store):
        raise ValueError(f"unknown audience {arguments.audience!r}")
    member = is_member(store, arguments.audience, arguments.user_id, arguments.tenant)
    scope = f"with tenant {arguments.tenant!r}" if arguments.tenant else "with no tenant"
    print(
        f"{arguments.user_id} is {'a member' if member else 'not a member'} of {arguments.audience} {scope}"
    )
    return 0 if member else 1


def upload(settings: Settings, arguments) -> int:
    """Upload a CSV file into a static audience: map columns to user fields (--map column=field,
    dots for nested properties), upsert the users, add them as members (tenant from
    --tenant-column). Rows with a missing or malformed id are skipped and written to a rejects file."""
    from audiences.static.uploads import parse_mapping, upload_csv

    store = _store(settings)
    result = upload_csv(
        store,
        arguments.audience,
        Path(arguments.file),
        _audience_types(settings, store),
        parse_mapping(arguments.map),
        arguments.tenant_column,
        settings.upload_max_bytes,
        Path(arguments.rejects) if arguments.rejects else None,
    )
    print(
        f"{arguments.file}: {result.rows:,} rows, {result.members_added:,} members added, "
        f"{result.members_unchanged:,} already members, {result.rejected:,} rejected"
        + (f" (see {result.rejects_file})" if result.rejects_file else "")
        + (f", {result.blank_lines} blank lines skipped" if result.blank_lines else "")
    )
    return 0


def sync(settings: Settings, arguments) -> int:
    """Run warehouse syncs (syncs.yml): each diffs its table or query against what it last wrote
    and applies only the changes, in insert or mirror mode; mass removals are held."""
    from audiences.membership.changes import CircuitBreaker
    from audiences.static.syncs import load_syncs, run_sync

    store = _store(settings)
    types = _audience_types(settings, store)
    syncs = [
        s
        for s in load_syncs(settings.syncs_file)
        if not arguments.names or s.name in arguments.names
    ]
    if not syncs:
        raise ValueError(f"no syncs to run in {settings.syncs_file}")
    for one in syncs:
        result = run_sync(
            store, one, types, CircuitBreaker(settings.breaker_share, settings.breaker_minimum)
        )
        held = f"; removals held as {result.held_batch}" if result.held_batch else ""
        print(
            f"{result.name}: {result.rows:,} rows, +{result.added:,} -{result.removed:,}, "
            f"{result.rejected:,} rejected{held}"
        )
    return 0


def eligible(settings: Settings, arguments) -> int:
    """Guide eligibility for a user (and the request's tenant): the guide's audience, with Knock's
    tenancy strict mode, and its property conditions. Exit code 0 when eligible, 1 when not."""
    from audiences.warehouse.evaluation import evaluation_time_for
    from audiences.warehouse.queries import connect
    from audiences.workflows.guides import eligible as guide_eligibility
    from audiences.workflows.guides import load_guide

    guide = load_guide(settings.guides_dir, arguments.guide)
    with connect(settings.duckdb_path, read_only=True) as connection:
        result = guide_eligibility(
            guide,
            arguments.user_id,
            arguments.tenant,
            _store(settings),
            connection,
            evaluation_time_for(settings.evaluation_time),
        )
    print(
        f"{arguments.user_id} is {'eligible' if result.eligible else 'not eligible'} for {arguments.guide}: "
        f"{result.reason}"
    )
    return 0 if result.eligible else 1


def backfill(settings: Settings, arguments) -> int:
    """Trigger a workflow once for every current member of its audience, who joined before the
    trigger existed (Knock never backfills; this is the explicit way). Running it twice sends
    nothing twice."""
    from audiences.workflows.broadcasts import broadcast as send_broadcast
    from audiences.workflows.setup import load_workflow_setup

    setup = load_workflow_setup(settings)
    trigger = setup.triggers.get(arguments.workflow)
    if trigger is None:
        raise ValueError(f"no workflow trigger {arguments.workflow!r} in {settings.workflows_dir}")
    if trigger.on != "entered":
        raise ValueError(
            f"{trigger.workflow_key!r} triggers on exit; a backfill sends entry triggers only"
        )
    result = send_broadcast(
        _store(settings),
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


def publish(settings: Settings, arguments) -> int:
    """Publish the warehouse's unpublished membership events to the store and queue their workflow
    triggers (the pipeline does this after each evaluation; this is for recovery)."""
    from audiences.membership.publish import publish_outbox
    from audiences.warehouse.evaluation import evaluation_time_for
    from audiences.warehouse.queries import WarehouseError, connect
    from audiences.workflows.setup import load_workflow_setup

    if (
        not settings.duckdb_path.exists()
    ):  # nothing to publish, and no empty warehouse to leave behind
        raise WarehouseError(f"{settings.duckdb_path}: no warehouse yet; run `audiences run` first")
    setup = load_workflow_setup(settings)
    with connect(settings.duckdb_path) as connection:
        report = publish_outbox(
            connection,
            _store(settings),
            setup.triggers,
            setup.default_sink,
            evaluation_time_for(settings.evaluation_time),
        )
    print(report)
    return 0


def validate(settings: Settings, arguments) -> int:
    """Validate every definition in the definitions folder: keys, operators, arguments (including
    relative times under 15 minutes), audience references and cycles, and, when a warehouse exists,
    that no audience changed type. Each problem names the file and the JSON path."""
    from audiences.conditions.definitions import (
        DefinitionError,
        load_definition_set,
        validate_definitions,
    )
    from audiences.dbt.models import custom_audience_keys
    from audiences.warehouse.evaluation import registered_types
    from audiences.warehouse.queries import WarehouseError, connect

    # Every problem at once: a broken file does not hide another file's unknown reference.
    found = load_definition_set(
        settings.definitions_dir, custom_audience_keys(settings.dbt_project_dir)
    )
    definitions = found.definitions
    existing: dict[str, str] = {}
    if settings.duckdb_path.exists():
        try:
            with connect(settings.duckdb_path, read_only=True) as connection:
                existing = registered_types(connection)
        except WarehouseError as error:
            print(f"warning: type changes not checked: {error}", file=sys.stderr)
    problems = found.problems + validate_definitions(
        definitions, custom_audience_keys(settings.dbt_project_dir), existing
    )
    if problems:
        raise DefinitionError(problems)
    from audiences.workflows.setup import load_workflow_setup

    setup = load_workflow_setup(settings)
    kinds = {
        kind: sum(d.type == kind for d in definitions.values()) for kind in ("dynamic", "static")
    }
    print(
        f"{len(definitions)} definitions are valid ({kinds['dynamic']} dynamic, {kinds['static']} static) "
        f"in {settings.definitions_dir}; {len(setup.triggers)} workflow triggers, sinks: "
        f"{', '.join(sorted(setup.sinks))} (default {setup.default_sink})"
    )
    return 0


def explain(settings: Settings, arguments) -> int:
    """Explain why a user is in or out of an audience: for each condition, the value seen and
    whether it holds, then each segment (conditions ANDed) and the verdict (segments ORed). The
    time is the last evaluation's, the one `members` lists, unless --evaluation-time (or
    AUDIENCES_EVALUATION_TIME) gives another; the output says which."""
    from audiences.warehouse.queries import connect
    from audiences.warehouse.queries import explain as run_explain

    definition, definitions = _definition(settings, arguments.audience)
    with connect(settings.duckdb_path, read_only=True) as connection:
        at, source = _chosen_time(settings, arguments, connection, default_to_last_evaluation=True)
        result = run_explain(connection, definition, definitions, arguments.user_id, at)
    verdict = "IN" if result.is_member else "OUT"
    print(
        f"{result.user_id} is {verdict} {definition.key} at {format_time(result.evaluated_at)} ({source})"
    )
    current = 0
    for verdict_row in result.verdicts:
        if verdict_row.segment != current:
            current = verdict_row.segment
            held = result.segments[current - 1]
            print(f"  segment {current}: {'true' if held else 'false'} (all conditions must hold)")
        mark = "true " if verdict_row.result else "false"
        condition = verdict_row.condition
        argument = (
            f" {json.dumps(condition['argument'], ensure_ascii=False)}"
            if "argument" in condition
            else ""
        )
        print(
            f"    {mark}  {condition['property']} {condition['operator']}{argument}   (value: {verdict_row.value})"
        )
    if not result.segments:
        print("  no segments: nobody matches")
    return 0


def generate(settings: Settings, arguments) -> int:
    """Regenerate the dbt models under dbt_project/ from the audience definitions. With --check,
    change nothing and fail if the files on disk differ from what the definitions generate. An
    audience whose definition has errors gets no model (its last members are kept); the others
    are generated, and the errors are listed (exit code 1)."""
    from audiences.conditions.definitions import load_definitions
    from audiences.dbt.models import drift, generate_models
    from audiences.dbt.project import generate as write_generated
    from audiences.settings import require_dbt_project

    if arguments.check:
        require_dbt_project(settings.dbt_project_dir)
        files = generate_models(
            load_definitions(settings.definitions_dir),
            settings.dbt_project_dir,
            source_label=settings.definitions_dir.name,
        )
        problems = drift(files, settings.dbt_project_dir)
        for problem in problems:
            print(problem)
        if problems:
            print(
                "error: generated models are out of date; run `audiences generate`", file=sys.stderr
            )
            return 1
        print(f"{len(files)} generated files are up to date")
        return 0
    from audiences.conditions.definitions import DefinitionError
    from audiences.dbt.project import project_definitions

    found = project_definitions(settings)
    changed = write_generated(settings, found)
    print(f"{len(changed)} files changed" + "".join(f"\n  {path}" for path in changed))
    if found.skipped:  # generated without them (their members are kept); say why
        raise DefinitionError(found.reasons)
    return 0


if __name__ == "__main__":
    sys.exit(main())
