"""What every command group shares: the global options, flag types and the store."""

from __future__ import annotations

import argparse
import contextlib

from audiences.settings import Settings

TIME_FORMAT = "ISO 8601, e.g. 2026-11-01T12:00:00Z or 2026-11-01"


def time_flag(value: str):
    """An ISO 8601 time given to a flag (UTC when it has no offset); argparse names the flag."""
    from audiences.settings import parse_evaluation_time

    try:
        return parse_evaluation_time(value) if value.strip() else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a time ({TIME_FORMAT})") from None


def port_number(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0-65535)")
    return int(value)


def global_options(parser: argparse.ArgumentParser, after_command: bool = False) -> None:
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
        type=time_flag,
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
        "--environment",
        help="the environment: its warehouse, store and definitions (AUDIENCES_ENV)",
        **default,
    )
    group.add_argument(
        "--debug", action="store_true", help="show the traceback of an error", **default
    )


class Parser(argparse.ArgumentParser):
    """Usage errors in two lines, the option and what was wrong, rather than the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")


def read_warehouse(settings: Settings):
    """The warehouse, read-only, for a command: waits for a run writing it, saying so on stderr,
    and keeps a run from starting until the command is done with it."""
    import sys

    from audiences.warehouse.queries import reading

    return reading(
        settings.duckdb_path, report=lambda message: print(message, file=sys.stderr, flush=True)
    )


@contextlib.contextmanager
def write_warehouse(settings: Settings, command: str):
    """The warehouse opened for writing by a command outside a run (`audiences publish`): it holds
    the writer lock as a run does, so it waits for a run or a reader, and they wait for it."""
    import sys

    from audiences.warehouse.lock import hold_writer_lock
    from audiences.warehouse.queries import connect

    with (
        hold_writer_lock(
            settings.duckdb_path,
            {"trigger": command},
            report=lambda message: print(message, file=sys.stderr, flush=True),
        ),
        connect(settings.duckdb_path) as connection,
    ):
        yield connection


def open_store(settings: Settings):
    """The environment's store, refused (one line) when it belongs to another environment: a
    `deliver --watch` of production pointed at development's store by a stray
    `AUDIENCES_STORE_URL` would send development's triggers through production's sinks."""
    from audiences.api.keys import bind_store
    from audiences.store.database import MembershipStore

    store = MembershipStore(settings.store_url).create()
    try:
        bind_store(store, settings.environment)
    except Exception:
        store.dispose()
        raise
    return store


def usable_definitions(settings: Settings) -> dict:
    """The definitions that load; a broken definition file must not stop work on other audiences."""
    from audiences.conditions.definitions import load_definition_set

    return (
        load_definition_set(settings.definitions_dir).definitions
        if settings.definitions_dir.is_dir()
        else {}
    )
