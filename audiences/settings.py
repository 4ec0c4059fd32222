"""The one place that decides where things live: DuckDB file, definitions, sources, dbt project.

Every entry point (CLI, Dagster, tests, benchmark) builds a `Settings` from environment variables
(optionally overridden by command-line flags), so pointing the tool at your own data is a matter of
setting `AUDIENCES_*` variables. Secrets never live here, only paths and choices.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

# The environment variable naming a test's fault point: a place where the process kills itself
# (SIGKILL), to test what a crash there leaves (`workflows.realtime`, `store.journal`,
# `static.uploads`); where a fault kills after an answer, it waits this long for the answer to go out.
FAULT_POINT = "AUDIENCES_FAULT_POINT"
FAULT_PAUSE_SECONDS = 1.0

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The engine's own dbt project and sample definitions: the template `audiences init` copies, and
# the sample's project. A user's project never writes into them.
ENGINE_DBT_PROJECT = PROJECT_ROOT / "dbt_project"
ENGINE_DEFINITIONS = PROJECT_ROOT / "data" / "audiences"

# Defaults spelled once: the circuit breaker (`membership.changes.CircuitBreaker`), Knock's 10 MB
# upload limit, and the API's body limit.
BREAKER_SHARE = 0.2
BREAKER_MINIMUM = 1000
UPLOAD_MAX_BYTES = 10 * 1024 * 1024
API_MAX_BODY_BYTES = 10 * 1024 * 1024
# Where the audiences are evaluated (docs/scale-out.md): DuckDB, or Apache Spark through dbt-spark
# (`spark`: in this machine's process; `cluster`: a Spark Thrift server).
ENGINES = ("duckdb", "spark")
SPARK_TARGETS = ("spark", "cluster")
SPARK_PORT = 10000

ENVIRONMENT_VARIABLES = {
    "AUDIENCES_DUCKDB": "the DuckDB warehouse file (default data/warehouse.duckdb)",
    "AUDIENCES_DEFINITIONS": "the audience definitions folder, Knock CLI layout (default data/audiences)",
    "AUDIENCES_SOURCES": "the YAML file that declares user sources (default data/sources.yml)",
    "AUDIENCES_USERS_SOURCE": "one user source (file, folder or URI) instead of the sources file",
    "AUDIENCES_SOURCE_MODE": "mode of AUDIENCES_USERS_SOURCE: snapshot (default) or stream",
    "AUDIENCES_EVALUATION_TIME": "fixed evaluation time, ISO 8601 (default: now, per run)",
    "AUDIENCES_DBT_PROJECT": "the dbt project folder (default ./dbt_project; `audiences init` creates one)",
    "AUDIENCES_WORKFLOWS": "the workflow triggers folder (default: `workflows` beside the definitions)",
    "AUDIENCES_SINKS": "the sinks YAML file (default data/sinks.yml; without it, a JSON-lines file)",
    "AUDIENCES_STORE_URL": "the membership store of AUDIENCES_ENV (default sqlite:///data/store.sqlite for "
    "development, data/<env>/store.sqlite for others; or postgresql://...)",
    "AUDIENCES_BREAKER_SHARE": "hold a run's events when more than this share of an audience moves "
    f"(default {BREAKER_SHARE})",
    "AUDIENCES_BREAKER_MINIMUM": f"... and at least this many users (default {BREAKER_MINIMUM})",
    "AUDIENCES_SYNCS": "the warehouse syncs YAML file (default: syncs.yml beside the definitions)",
    "AUDIENCES_GUIDES": "the guides folder (default: guides beside the definitions)",
    "AUDIENCES_UPLOAD_MAX_BYTES": f"the largest CSV upload, in bytes (default {UPLOAD_MAX_BYTES}, Knock's 10 MB)",
    "AUDIENCES_DUCKDB_MEMORY_LIMIT": "DuckDB's memory limit for evaluation and loading (default 1500MB)",
    "AUDIENCES_ENV": "the environment every command works in (default: the first of AUDIENCES_ENVIRONMENTS)",
    "AUDIENCES_ENVIRONMENTS": "the environments, in promotion order, comma-separated (default development,production)",
    "AUDIENCES_API_ENVIRONMENTS": "environments the API serves, comma-separated (default AUDIENCES_ENVIRONMENTS)",
    "AUDIENCES_DUCKDB_<ENV>": "the warehouse of one environment (default: AUDIENCES_DUCKDB for the first, "
    "<its folder>/<env>/<its name> for the others)",
    "AUDIENCES_DBT_PROJECT_<ENV>": "the dbt project of one environment (default: AUDIENCES_DBT_PROJECT for the "
    "first, a copy in <data>/<env>/dbt_project that promotion refreshes for the others)",
    "AUDIENCES_STORE_URL_<ENV>": "the store of one environment, e.g. AUDIENCES_STORE_URL_PRODUCTION (default: "
    "AUDIENCES_STORE_URL for AUDIENCES_ENV, else the environment's default store)",
    "AUDIENCES_DEFINITIONS_<ENV>": "the definitions one environment evaluates (default: AUDIENCES_DEFINITIONS, the "
    "working files, for the first; <data>/<env>/audiences, written from its promoted commits, for the others)",
    "AUDIENCES_PROMOTION_EVALUATES": "whether a promotion through the API starts the target's evaluation at once "
    "(default true)",
    "AUDIENCES_REALTIME": "whether an identify through the API re-evaluates that user's dynamic audiences at once "
    "(default true; false leaves every change to the next pipeline run)",
    "AUDIENCES_API_WRITE_RATE": "API writes per second per environment (default 60, Knock's tier 3)",
    "AUDIENCES_API_READ_RATE": "API reads per second per environment (default 200, Knock's tier 4)",
    "AUDIENCES_API_DELETE_RATE": "API deletes and merges per second per environment (default 5, Knock's tier 2)",
    "AUDIENCES_API_BULK_RATE": "API bulk operations per second per environment (default 1, Knock's tier 1)",
    "AUDIENCES_API_MAX_BODY_BYTES": f"the largest API request body, in bytes (default {API_MAX_BODY_BYTES})",
    "AUDIENCES_ENGINE": "where the Dagster code location evaluates the audiences: duckdb (default) or spark "
    "(adds the job spark_audiences_job; docs/scale-out.md)",
    "AUDIENCES_SPARK_WAREHOUSE": "the local Spark warehouse folder, tables and metastore (default: spark-warehouse "
    "beside the DuckDB file; a later environment's: <it>/<env>)",
    "AUDIENCES_SPARK_TARGET": "spark: Spark inside dbt's process (default); cluster: a Spark Thrift server",
    "AUDIENCES_SPARK_HOST": "the Spark Thrift server's host (AUDIENCES_SPARK_TARGET=cluster)",
    "AUDIENCES_SPARK_PORT": f"its port (default {SPARK_PORT})",
    "AUDIENCES_SPARK_DRIVER_JAVA_OPTIONS": "the local Spark driver JVM's options (default: Java's)",
}


@dataclass(frozen=True)
class Settings:
    duckdb_path: Path
    definitions_dir: Path
    sources_file: Path
    users_source: str | None
    source_mode: str
    evaluation_time: datetime | None
    dbt_project_dir: Path
    environment: str
    workflows_dir: Path | None = None
    sinks_file: Path | None = None
    store_url: str | None = None
    breaker_share: float = BREAKER_SHARE
    breaker_minimum: int = BREAKER_MINIMUM
    upload_max_bytes: int = UPLOAD_MAX_BYTES
    # The analysts' working files and the first environment's warehouse: the other environments'
    # outputs are derived from them (None: the same as `definitions_dir` and `duckdb_path`).
    working_definitions_dir: Path | None = None
    warehouse_root: Path | None = None

    @property
    def syncs_file(self) -> Path:
        return (
            _absolute(os.environ["AUDIENCES_SYNCS"])
            if os.environ.get("AUDIENCES_SYNCS")
            else self.definitions_dir.parent / "syncs.yml"
        )

    @property
    def guides_dir(self) -> Path:
        return (
            _absolute(os.environ["AUDIENCES_GUIDES"])
            if os.environ.get("AUDIENCES_GUIDES")
            else self.definitions_dir.parent / "guides"
        )

    @property
    def dagster_home(self) -> Path:
        """The Dagster instance's folder, one for `audiences run` and `dg dev`: DAGSTER_HOME, else
        `dagster_home` in the working folder."""
        return _absolute(os.environ.get("DAGSTER_HOME") or "dagster_home")

    @property
    def dagster_url(self) -> str | None:
        """The Dagster UI whose code location a promotion reloads, so it shows the target's new
        audiences at once: AUDIENCES_DAGSTER_URL, else `dg dev`'s default address; "none" (or
        empty) reloads nothing."""
        value = os.environ.get("AUDIENCES_DAGSTER_URL", "http://127.0.0.1:3000").strip()
        return None if value.lower() in ("", "none", "off") else value.rstrip("/")

    @property
    def environments(self) -> list[str]:
        """Every environment, in promotion order: the first is where definitions are edited and
        committed, and each later one receives the commits promoted from the one before."""
        return environment_names(os.environ)

    @property
    def development_environment(self) -> str:
        return self.environments[0]

    @property
    def api_environments(self) -> list[str]:
        names = os.environ.get("AUDIENCES_API_ENVIRONMENTS")
        if not names:
            return self.environments
        return [name.strip() for name in names.split(",") if name.strip()]

    def environment_folder(self, environment: str) -> Path:
        """Where an environment's own files live: the warehouse's folder for the first
        environment, `<that folder>/<environment>` for the others."""
        root = (self.warehouse_root or self.duckdb_path).parent
        return root if environment == self.development_environment else root / environment

    def duckdb_path_for(self, environment: str) -> Path:
        """Each environment has its own warehouse, so a promotion's re-evaluation and its events
        never touch another environment's members."""
        explicit = os.environ.get(f"AUDIENCES_DUCKDB_{_suffix(environment)}")
        if explicit:
            return _absolute(explicit)
        if environment == self.environment:
            return self.duckdb_path
        name = (self.warehouse_root or self.duckdb_path).name
        return self.environment_folder(environment) / name

    def dbt_project_dir_for(self, environment: str) -> Path:
        """The first environment's dbt project is the analysts' one; a later environment evaluates
        its promoted definitions in a copy of it (the generated models differ between them)."""
        explicit = os.environ.get(f"AUDIENCES_DBT_PROJECT_{_suffix(environment)}")
        if explicit:
            return _absolute(explicit)
        if environment == self.environment:
            return self.dbt_project_dir
        if environment == self.development_environment:
            return _absolute(os.environ.get("AUDIENCES_DBT_PROJECT") or default_dbt_project())
        return self.environment_folder(environment) / "dbt_project"

    def written_by_promotion(self, environment: str) -> bool:
        """Whether promotion writes the environment's definitions folder and dbt project: a later
        environment's, unless AUDIENCES_DEFINITIONS_<ENV> names a folder of one's own."""
        return environment != self.development_environment and not os.environ.get(
            f"AUDIENCES_DEFINITIONS_{_suffix(environment)}"
        )

    def for_environment(self, environment: str) -> Settings:
        """These settings, pointed at another environment (its warehouse, store, definitions and
        dbt project)."""
        if environment == self.environment:
            return self
        shared_sinks = self.working_definitions_dir.parent / "sinks.yml"
        own_sinks = self.environment_folder(environment) / "sinks.yml"
        return replace(
            self,
            environment=environment,
            duckdb_path=self.duckdb_path_for(environment),
            definitions_dir=self.definitions_dir_for(environment),
            dbt_project_dir=self.dbt_project_dir_for(environment),
            store_url=self.store_url_for(environment),
            sinks_file=own_sinks
            if self.sinks_file == shared_sinks and own_sinks.exists()
            else self.sinks_file,
        )

    @property
    def promotion_evaluates(self) -> bool:
        """A promotion through the management API (`knock commit promote`) evaluates the target
        environment at once, as `audiences promote` does; AUDIENCES_PROMOTION_EVALUATES=false is
        its `--no-evaluate`."""
        return os.environ.get("AUDIENCES_PROMOTION_EVALUATES", "true").lower() not in (
            "false",
            "0",
            "no",
        )

    @property
    def realtime(self) -> bool:
        """An identify through the API re-evaluates that user's dynamic audiences at once and
        records their events (`workflows/realtime.py`); off, changes wait for the next run."""
        return os.environ.get("AUDIENCES_REALTIME", "true").lower() not in ("false", "0", "no")

    @property
    def api_write_rate(self) -> float:
        return _positive_rate("AUDIENCES_API_WRITE_RATE", 60.0)

    @property
    def api_read_rate(self) -> float:
        return _positive_rate("AUDIENCES_API_READ_RATE", 200.0)

    @property
    def api_delete_rate(self) -> float:
        return _positive_rate("AUDIENCES_API_DELETE_RATE", 5.0)

    @property
    def api_bulk_rate(self) -> float:
        return _positive_rate("AUDIENCES_API_BULK_RATE", 1.0)

    @property
    def api_max_body_bytes(self) -> int:
        return _variable(os.environ, "AUDIENCES_API_MAX_BODY_BYTES", int, API_MAX_BODY_BYTES)

    @property
    def engine(self) -> str:
        """Where the Dagster code location evaluates the audiences: `duckdb` (the dbt assets), or
        `spark` (also the Spark assets and `spark_audiences_job`, `pipelines/defs/spark.py`)."""
        return _choice("AUDIENCES_ENGINE", ENGINES)

    @property
    def spark_target(self) -> str:
        """The Spark dbt target: `spark` (in dbt's process) or `cluster` (a Thrift server)."""
        return _choice("AUDIENCES_SPARK_TARGET", SPARK_TARGETS)

    @property
    def spark_host(self) -> str | None:
        return os.environ.get("AUDIENCES_SPARK_HOST") or None

    @property
    def spark_port(self) -> int:
        return _variable(os.environ, "AUDIENCES_SPARK_PORT", int, SPARK_PORT)

    @property
    def spark_warehouse(self) -> Path:
        """The local Spark warehouse (tables, metastore, the published events' files): the
        AUDIENCES_SPARK_WAREHOUSE folder for the first environment and `<it>/<environment>` for
        a later one, else `spark-warehouse` beside the environment's DuckDB file."""
        explicit = os.environ.get("AUDIENCES_SPARK_WAREHOUSE")
        if not explicit:
            return self.duckdb_path.parent / "spark-warehouse"
        folder = _absolute(explicit)
        if self.environment in ("", self.development_environment):
            return folder
        return folder / self.environment

    def store_url_for(self, environment: str) -> str:
        """Each environment's data lives in its own store, so no key of one can see another's. An
        environment's default store does not depend on `AUDIENCES_ENV`, so that `audiences keys` and
        `audiences serve` find the same store for it whatever environment each ran in."""
        explicit = os.environ.get(f"AUDIENCES_STORE_URL_{_suffix(environment)}")
        if explicit:
            return explicit
        if environment == self.environment:
            return self.store_url
        return self.default_store_url(environment)

    def default_store_url(self, environment: str) -> str:
        """`store.sqlite` beside the DuckDB file for the first environment (development), and
        `<environment>/store.sqlite` there for the others."""
        return f"sqlite:///{self.environment_folder(environment) / 'store.sqlite'}"

    def definitions_dir_for(self, environment: str) -> Path:
        """The definitions an environment evaluates: the working files in the first environment,
        and in the others the folder written from their promoted commits (the store holds them)."""
        explicit = os.environ.get(f"AUDIENCES_DEFINITIONS_{_suffix(environment)}")
        if explicit:
            return _absolute(explicit)
        if environment == self.development_environment:
            return self.working_definitions_dir or self.definitions_dir
        if environment == self.environment:
            return self.definitions_dir
        return self.environment_folder(environment) / "audiences"

    def __post_init__(self):
        # Defaults that depend on other settings: workflows beside the definitions, the store and
        # the sinks file beside the DuckDB file's folder.
        if self.working_definitions_dir is None:
            object.__setattr__(self, "working_definitions_dir", self.definitions_dir)
        if self.warehouse_root is None:
            object.__setattr__(self, "warehouse_root", self.duckdb_path)
        working = self.working_definitions_dir
        if self.workflows_dir is None:
            object.__setattr__(self, "workflows_dir", working.parent / "workflows")
        if self.sinks_file is None:
            # A later environment's own sinks file, when it has one, sends its deliveries apart.
            own = self.environment_folder(self.environment) / "sinks.yml"
            shared = working.parent / "sinks.yml"
            first = self.environment in ("", self.development_environment)
            object.__setattr__(self, "sinks_file", shared if first or not own.exists() else own)
        if self.store_url is None:
            object.__setattr__(self, "store_url", self.default_store_url(self.environment))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        """Read `AUDIENCES_*` variables; keyword overrides (from CLI flags) win when not None."""
        env = os.environ if environ is None else environ

        def path(name: str, default: str) -> Path:
            return _absolute(env.get(name) or default)

        settings = cls(
            duckdb_path=path("AUDIENCES_DUCKDB", "data/warehouse.duckdb"),
            definitions_dir=path("AUDIENCES_DEFINITIONS", "data/audiences"),
            sources_file=path("AUDIENCES_SOURCES", "data/sources.yml"),
            users_source=env.get("AUDIENCES_USERS_SOURCE") or None,
            source_mode=env.get("AUDIENCES_SOURCE_MODE") or "snapshot",
            evaluation_time=_variable(
                env, "AUDIENCES_EVALUATION_TIME", parse_evaluation_time, None
            ),
            dbt_project_dir=_absolute(env["AUDIENCES_DBT_PROJECT"])
            if env.get("AUDIENCES_DBT_PROJECT")
            else default_dbt_project(),
            environment=env.get("AUDIENCES_ENV") or environment_names(env)[0],
            workflows_dir=_absolute(env["AUDIENCES_WORKFLOWS"])
            if env.get("AUDIENCES_WORKFLOWS")
            else None,
            sinks_file=_absolute(env["AUDIENCES_SINKS"]) if env.get("AUDIENCES_SINKS") else None,
            store_url=env.get("AUDIENCES_STORE_URL") or None,
            breaker_share=_variable(env, "AUDIENCES_BREAKER_SHARE", float, BREAKER_SHARE),
            breaker_minimum=_variable(env, "AUDIENCES_BREAKER_MINIMUM", int, BREAKER_MINIMUM),
            upload_max_bytes=_variable(env, "AUDIENCES_UPLOAD_MAX_BYTES", int, UPLOAD_MAX_BYTES),
        )
        given = {key: value for key, value in overrides.items() if value is not None}
        for key in (
            "duckdb_path",
            "definitions_dir",
            "sources_file",
            "dbt_project_dir",
            "workflows_dir",
            "sinks_file",
        ):
            if key in given:
                given[key] = _absolute(given[key])
        if isinstance(given.get("evaluation_time"), str):
            given["evaluation_time"] = parse_evaluation_time(given["evaluation_time"])
        # Derived defaults follow their base setting unless they were set explicitly.
        explicit = {
            name
            for name in ("workflows_dir", "sinks_file", "store_url")
            if env.get(_VARIABLE[name]) or name in given
        }
        rebuilt = replace(settings, **given)
        if rebuilt.environment not in environment_names(env):
            raise ValueError(
                f"unknown environment {rebuilt.environment!r}; the environments are "
                f"{', '.join(environment_names(env))} (AUDIENCES_ENVIRONMENTS)"
            )
        # Each environment evaluates its own definitions in its own warehouse and dbt project,
        # unless a flag names them: derived from the working files and the first warehouse.
        base = replace(
            rebuilt,
            working_definitions_dir=rebuilt.definitions_dir,
            warehouse_root=rebuilt.duckdb_path,
            environment="",
        )
        environment = rebuilt.environment
        derived = {"definitions_dir": base.definitions_dir_for(environment)}
        if "duckdb_path" not in given:
            derived["duckdb_path"] = base.duckdb_path_for(environment)
        if "dbt_project_dir" not in given:
            derived["dbt_project_dir"] = base.dbt_project_dir_for(environment)
        rebuilt = replace(base, environment=environment, **derived)
        for name in ("workflows_dir", "sinks_file", "store_url"):
            if name not in explicit:
                rebuilt = replace(rebuilt, **{name: None})
        return rebuilt

    def environment_variables(self) -> dict[str, str]:
        """These settings as `AUDIENCES_*` variables, to hand to a child process."""
        suffix = _suffix(self.environment)
        values = {
            # dbt's profile reads AUDIENCES_DUCKDB: this environment's own warehouse.
            "AUDIENCES_DUCKDB": str(self.duckdb_path),
            f"AUDIENCES_DUCKDB_{suffix}": str(self.duckdb_path),
            "AUDIENCES_DEFINITIONS": str(self.working_definitions_dir),
            f"AUDIENCES_DEFINITIONS_{suffix}": str(self.definitions_dir),
            f"AUDIENCES_DBT_PROJECT_{suffix}": str(self.dbt_project_dir),
            "AUDIENCES_SOURCES": str(self.sources_file),
            "AUDIENCES_SOURCE_MODE": self.source_mode,
            "AUDIENCES_DBT_PROJECT": str(self.dbt_project_dir),
            "AUDIENCES_ENV": self.environment,
            "AUDIENCES_WORKFLOWS": str(self.workflows_dir),
            "AUDIENCES_SINKS": str(self.sinks_file),
            "AUDIENCES_STORE_URL": self.store_url,
            "AUDIENCES_BREAKER_SHARE": str(self.breaker_share),
            "AUDIENCES_BREAKER_MINIMUM": str(self.breaker_minimum),
        }
        if self.users_source:
            values["AUDIENCES_USERS_SOURCE"] = self.users_source
        if self.evaluation_time:
            values["AUDIENCES_EVALUATION_TIME"] = format_time(self.evaluation_time)
        return values


def _variable(env, name: str, parse, default):
    """The variable's value parsed, or the default when it is unset or empty; a bad value is an
    error that names the variable."""
    value = env.get(name)
    if not value:
        return default
    try:
        return parse(value)
    except ValueError:
        kind = {float: "a number", int: "a whole number"}.get(
            parse, "an ISO 8601 time, e.g. 2026-11-01T12:00:00Z"
        )
        raise ValueError(f"{name}={value!r} is not {kind}") from None


@contextlib.contextmanager
def dotenv_variables(folder: Path | None = None):
    """The variables of `.env` in the working folder (as `.env.example` describes), set for as long
    as the block runs. A variable already in the environment wins over `.env`, and flags win over
    both (`Settings.from_env`). Yields the names that came from `.env`."""
    from dotenv import dotenv_values

    path = (folder or Path.cwd()) / ".env"
    values = dotenv_values(path) if path.is_file() else {}
    added = {
        name: value
        for name, value in values.items()
        if value is not None and name not in os.environ
    }
    os.environ.update(added)
    try:
        yield added
    finally:
        for name in added:
            os.environ.pop(name, None)


def environment_names(environ) -> list[str]:
    """The environments in promotion order (AUDIENCES_ENVIRONMENTS; default development,
    production)."""
    names = environ.get("AUDIENCES_ENVIRONMENTS") or "development,production"
    return [name.strip() for name in names.split(",") if name.strip()]


def _suffix(environment: str) -> str:
    """The environment as a variable name's suffix: `AUDIENCES_STORE_URL_PRODUCTION`."""
    return environment.upper().replace("-", "_")


_VARIABLE = {
    "workflows_dir": "AUDIENCES_WORKFLOWS",
    "sinks_file": "AUDIENCES_SINKS",
    "store_url": "AUDIENCES_STORE_URL",
}


def _choice(variable: str, choices: tuple[str, ...]) -> str:
    """The variable's value, one of `choices` (the first when unset); any other is an error
    that names the variable."""
    value = (os.environ.get(variable) or choices[0]).strip().lower()
    if value not in choices:
        raise ValueError(f"{variable}={value!r} is not one of {', '.join(choices)}")
    return value


def _positive_rate(variable: str, default: float) -> float:
    value = _variable(os.environ, variable, float, default)
    if value <= 0:
        raise ValueError(f"{variable} must be a positive number of requests a second, not {value}")
    return value


def default_dbt_project() -> Path:
    """`dbt_project` in the working folder, like every other path. Never the engine's own from
    elsewhere: generating a user's models there rewrote the engine's sample (`audiences init`
    makes a project folder with its own dbt project)."""
    return _absolute("dbt_project")


# The sha256 of each `dagster.yaml` the engine shipped before the current one (git history of
# dagster_home/dagster.yaml). A project's copy equal to one of them was never edited, so it is
# brought up to date (the fork-server launcher, the instance class); an edited copy is its owner's.
_SHIPPED_DAGSTER_YAML = frozenset(
    {
        "40bad8b71ef1a272d3a886e3c480c8c31b58feed22261f2ecd16241ff689df61",
        "d5ba46af2dfebf9b95bcf3d0e8e7ac90340293dee254c7d10d4279428e8f1e3b",
        "5801bb7cf3bf31e015ca769b55968d7f040ed2c4439a10dd6c75b78bb96636a4",
    }
)


def prepare_dagster_home(folder: Path) -> Path:
    """A Dagster instance folder ready to use: created, with the engine's `dagster.yaml` (which
    serializes the runs that write DuckDB) when it has none, or when it has an unedited copy of
    an earlier one. Written whole or not at all (a kill mid-write leaves the old file). Returns
    the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    instance_file = folder / "dagster.yaml"
    current = (PROJECT_ROOT / "dagster_home" / "dagster.yaml").read_bytes()
    if instance_file.exists():
        kept = instance_file.read_bytes()
        if kept == current or hashlib.sha256(kept).hexdigest() not in _SHIPPED_DAGSTER_YAML:
            return folder
    written = instance_file.with_name(f".dagster.yaml.{os.getpid()}.tmp")
    written.write_bytes(current)
    os.replace(written, instance_file)
    return folder


def require_dbt_project(project_dir: Path) -> None:
    """Refuse a dbt project folder without `dbt_project.yml`, saying how to get one."""
    if not (project_dir / "dbt_project.yml").is_file():
        raise FileNotFoundError(
            f"{project_dir}: not a dbt project (no dbt_project.yml); run `audiences init` to make this folder "
            f"a project, or point --dbt-project or AUDIENCES_DBT_PROJECT at one"
        )


def _absolute(value: str | Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (Path.cwd() / path).resolve()


def parse_evaluation_time(value: str | None) -> datetime | None:
    """Parse an ISO 8601 evaluation time; naive times are UTC. `None` or '' means "now"."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"evaluation time {value!r} is not an ISO 8601 timestamp (e.g. 2026-11-01T12:00:00Z)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def format_time(moment: datetime) -> str:
    """UTC ISO 8601 with microseconds and a `Z`, the one format we write times in."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utc_now() -> datetime:
    return datetime.now(UTC)


@contextlib.contextmanager
def environment_set(values: dict[str, str]):
    """These variables in this process's environment for the duration of the block only (the
    settings for Dagster and dbt during a run); what was there before is put back after."""
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
