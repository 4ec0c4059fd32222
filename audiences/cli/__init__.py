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
import sys
import traceback
from pathlib import Path

from audiences.cli import delivery, inspect, project, runs, service, spark, static
from audiences.cli.common import Parser, global_options
from audiences.lifecycle.commands import register as lifecycle_commands
from audiences.settings import ENVIRONMENT_VARIABLES, Settings, dotenv_variables


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
                environment=arguments.environment,
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


def _parser() -> argparse.ArgumentParser:
    variables = "\n".join(
        f"  {name:27} {meaning}" for name, meaning in ENVIRONMENT_VARIABLES.items()
    )
    parser = Parser(
        prog="audiences",
        description="A warehouse-native, Knock-compatible audiences engine (Dagster, DuckDB, dbt).",
        epilog=f"Environment variables (flags override them):\n{variables}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    global_options(parser)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=handler.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        global_options(sub, after_command=True)
        sub.set_defaults(handler=handler)
        return sub

    project.register(command)
    runs.register(command)
    inspect.register(command)
    delivery.register(command)
    static.register(command)
    service.register(command)
    spark.register(command)
    lifecycle_commands(command)
    return parser
