"""dagster-dbt's resource running its dbt commands in the Dagster run's own process.

dagster-dbt 0.29 starts every dbt command as a subprocess: a new Python that imports dbt again,
although the run's process has imported most of it already (dagster-dbt imports dbt's adapters).
Here the command runs in this process (`audiences.dbt.runner.run_dbt_here`), and everything
dagster-dbt does around it stays as it is: the same arguments and environment (the run's own
target folder, `partial_parse.msgpack` copied into it so dbt skips parsing, the JSON log), and the
same events, handed to dagster-dbt as the lines the subprocess would have printed, so its
materializations, checks and errors are unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster_dbt.core import resource as dagster_dbt_resource
from dagster_dbt.core.dbt_cli_invocation import (
    PARTIAL_PARSE_FILE_NAME,
    DbtCliInvocation,
    _get_dbt_target_path,
    logger,
)

from audiences.dbt.runner import run_dbt_here

# The partial-parse files of the profiles a project was run with (`parse_cache`), in its target.
PARSE_CACHE_FOLDER = "partial_parse"
# Whether dbt commands started in this context run here (`dbt_in_this_process`).
_HERE = contextvars.ContextVar("dbt_in_this_process", default=False)


@dataclass
class FinishedDbt:
    """The part of a `subprocess.Popen` that dagster-dbt reads, for a dbt command that already ran
    in this process."""

    args: list[str]
    returncode: int
    stdout: None = None

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode

    def send_signal(self, signal: int) -> None:
        """Nothing to interrupt: the command has finished."""


def parse_cache(project_dir: Path, environment: Mapping[str, str]) -> Path:
    """Where the partial-parse file of a dbt profile is kept between commands. dbt parses the whole
    project again when the profile's connection differs from the one the file was parsed with (the
    DuckDB file's path, its settings: "Unable to do partial parsing because profile has changed"),
    so a project that several warehouses share (environments' copies, the tests' warehouses) keeps
    one file per profile: keyed by the values of the variables `profiles.yml` reads."""
    profile = (project_dir / "profiles.yml").read_text(encoding="utf-8")
    names = sorted(set(re.findall(r"env_var\(\s*['\"]([A-Za-z0-9_]+)['\"]", profile)))
    key = hashlib.sha256(repr([(name, environment.get(name)) for name in names]).encode())
    return project_dir / "target" / PARSE_CACHE_FOLDER / f"{key.hexdigest()[:16]}.msgpack"


def _project_parse_file(project_dir: Path) -> Path:
    current = _get_dbt_target_path()
    folder = current if current.is_absolute() else project_dir / current
    return folder / PARTIAL_PARSE_FILE_NAME


def _keep_parse(written: Path, copied: int | None, cache: Path) -> None:
    """After a command that parsed (its target folder's partial-parse file is not the one copied
    in), keep that file as its profile's; written beside, then renamed into place."""
    if not written.exists() or written.stat().st_mtime_ns == copied:
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    scratch = cache.with_name(f".{cache.name}.{os.getpid()}")
    shutil.copyfile(written, scratch)
    os.replace(scratch, cache)


@dataclass
class InProcessDbtInvocation(DbtCliInvocation):
    """dagster-dbt's invocation of a dbt command, the command run in this process (`run_dbt_here`)
    rather than in a subprocess; streaming its events and reporting its errors are dagster-dbt's."""

    _events: list[dict[str, Any]] = field(init=False, default_factory=list)

    @classmethod
    def run(
        cls,
        args,
        env,
        manifest,
        dagster_dbt_translator,
        project_dir,
        target_path,
        raise_on_error,
        context,
        adapter,
        cli_version,
        dbt_project=None,
    ) -> DbtCliInvocation:
        if not _HERE.get():
            return DbtCliInvocation.run.__func__(  # dagster-dbt's subprocess
                DbtCliInvocation,
                args,
                env,
                manifest,
                dagster_dbt_translator,
                project_dir,
                target_path,
                raise_on_error,
                context,
                adapter,
                cli_version,
                dbt_project,
            )
        # As dagster-dbt does, a partial-parse file copied into the command's own target folder lets
        # dbt skip parsing a project that has not changed: here the one last written for this
        # command's profile (`parse_cache`), since dbt parses again when the profile differs.
        cache = parse_cache(project_dir, env)
        destination = target_path.joinpath(PARTIAL_PARSE_FILE_NAME)
        source = cache if cache.exists() else _project_parse_file(project_dir)
        copied = None
        if source.exists() and not destination.exists():
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, destination)
            copied = destination.stat().st_mtime_ns
        # dagster-dbt's own line, which the run's log (and what reads it) expects.
        logger.info(f"Running dbt command: `{' '.join(args)}`.")
        code, events, error = run_dbt_here(list(args[1:]), env, project_dir)
        _keep_parse(destination, copied, cache)
        invocation = cls(
            process=FinishedDbt(list(args), code),  # type: ignore[arg-type]
            manifest=manifest,
            project=dbt_project,
            dagster_dbt_translator=dagster_dbt_translator,
            project_dir=project_dir,
            target_path=target_path,
            raise_on_error=raise_on_error,
            context=context,
            adapter=adapter,
            cli_version=cli_version,
        )
        invocation._events = events
        if error is not None and not any(e["info"]["level"] == "error" for e in events):
            invocation._error_messages.append(f"{type(error).__name__}: {error}")
        return invocation

    def _stream_stdout(self) -> Iterator[str | dict[str, Any]]:
        """The command's events, once (as a subprocess's output is read once)."""
        events, self._events = self._events, []
        for event in events:
            if event["info"]["level"] == "error":
                self._error_messages.append(event["info"]["msg"])
            yield event


@contextlib.contextmanager
def dbt_in_this_process() -> Iterator[None]:
    """While open, the dbt commands dagster-dbt's resource starts in this context (this thread)
    run in this process."""
    token = _HERE.set(True)
    try:
        yield
    finally:
        _HERE.reset(token)


# dagster-dbt's resource starts each command through this name: commands run in a subprocess, as
# dagster-dbt runs them, unless `dbt_in_this_process` says otherwise.
dagster_dbt_resource.DbtCliInvocation = InProcessDbtInvocation
