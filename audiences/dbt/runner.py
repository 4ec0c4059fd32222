"""dbt run inside this process (dbt's `dbtRunner`) as it runs as a command: `run_dbt_here`.

A dbt command started as a subprocess pays a new Python that imports dbt-core, the adapter and
mashumaro's (de)serialisers (about 3 s of CPU on this machine) before it does anything; a process
that runs dbt again and again (a Dagster run, whose process has imported most of dbt already
through dagster-dbt) pays that once here.

What a subprocess gave for free, and this keeps:
- its own environment and working folder: both are set for the command and restored after it;
- letting go of the warehouse when it exits: dbt-duckdb keeps its DuckDB database open in the
  process after the command (one per process, `DuckDBConnectionManager`), and DuckDB refuses a
  second handle on the same file with other settings, so it is closed when the command ends;
- closing its log file and forgetting its loggers when the command ends;
- one command at a time: dbt's flags, adapters and event manager are global to the process, so
  commands in one process run one after another.
What it does not keep: a crash of DuckDB inside dbt ends this process, not only dbt.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# The levels dbt's console log prints by default: the lines a subprocess's reader gets.
CONSOLE_LEVELS = frozenset({"info", "warn", "error"})
# dbt's own console log stays quiet (its events reach the caller through a callback); the file
# log (`dbt.log` in the log folder) keeps its level, which a console level would set.
_QUIET_CONSOLE = ("--log-level", "none", "--log-level-file", "debug")
_ONE_AT_A_TIME = threading.Lock()


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """This process's environment replaced by `values` (what dagster-dbt hands its subprocess),
    then restored."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _release_duckdb() -> None:
    """Close the DuckDB database dbt-duckdb keeps open in this process after a command."""
    connections = sys.modules.get("dbt.adapters.duckdb.connections")
    if connections is None:
        return
    manager = connections.DuckDBConnectionManager
    with manager._LOCK:
        if manager._ENV is not None:
            manager._ENV.close()
            manager._ENV = None


def _close_logs() -> None:
    """Close the log files dbt opened for a command (dbt drops them unclosed at its next command)
    and forget its loggers and callbacks, as a subprocess's exit would."""
    from dbt_common.events.event_manager_client import cleanup_event_logger, get_event_manager

    for logger in get_event_manager().loggers:
        python_logger = getattr(logger, "_python_logger", None)
        for handler in list(python_logger.handlers) if python_logger else []:
            handler.close()
            python_logger.removeHandler(handler)
    cleanup_event_logger()


def _forget_frames(error: BaseException | None) -> None:
    """Drop the frames a failed command's exception (and those it chains) keeps alive: they hold
    dbt's thread pool, which must end with the command, not whenever the caller lets the exception
    go (the message and type stay)."""
    while error is not None:
        if error.__traceback__ is not None:
            traceback.clear_frames(error.__traceback__)
            error.__traceback__ = None
        error = error.__cause__ or error.__context__


def run_dbt_here(
    arguments: list[str], environment: Mapping[str, str], folder: Path
) -> tuple[int, list[dict[str, Any]], BaseException | None]:
    """Run one dbt command (`arguments` without the executable) in this process, in `folder` with
    `environment`, as a subprocess would run: its exit code (0, 1 when the command failed, 2 when
    dbt stopped with an error), the console log's events as dbt's JSON log prints them, and the
    exception dbt stopped with, if any."""
    from dbt.cli.main import dbtRunner
    from dbt_common.events.functions import msg_to_dict
    from dbt_common.exceptions.base import env_secrets, scrub_secrets
    from dbt_common.utils.encoding import ForgivingJSONEncoder

    events: list[dict[str, Any]] = []

    def keep(message) -> None:
        if message.info.level in CONSOLE_LEVELS:  # what dbt's JSON console log would print
            line = json.dumps(msg_to_dict(message), sort_keys=True, cls=ForgivingJSONEncoder)
            events.append(json.loads(scrub_secrets(line, env_secrets())))

    with _ONE_AT_A_TIME, _environment(environment), contextlib.chdir(folder):
        error: BaseException | None = None
        try:
            result = dbtRunner(callbacks=[keep]).invoke([*arguments, *_QUIET_CONSOLE])
            error, success = result.exception, result.success
            del result
        finally:
            _release_duckdb()
            _close_logs()
            # A command that fails leaves dbt's thread pool running until it is collected: end
            # it now, as a subprocess's exit would, not in the middle of later work.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                _forget_frames(error)
                gc.collect()
    if error is not None and not isinstance(error, Exception):
        raise error  # an interrupt (Dagster's termination, Ctrl-C) stops the run, as it stopped dbt
    code = 0 if success else (2 if error is not None else 1)
    return code, events, error
