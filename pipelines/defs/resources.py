"""Resources: the DuckDB warehouse and the dbt CLI, both located by `audiences.settings`, and how
each environment's objects are named in the one code location."""

import contextlib
import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import version
from pathlib import Path

import dagster as dg
from dagster_dbt import DbtCliResource
from packaging.version import Version
from pydantic import Field

from audiences.dbt.project import dbt_executable
from audiences.settings import Settings, environment_set
from audiences.warehouse.lock import hold_writer_lock
from audiences.warehouse.queries import connect
from pipelines.defs.dbt_in_process import dbt_in_this_process


class DbtResource(DbtCliResource):
    """dagster-dbt's dbt CLI resource, without two steps it takes before each dbt command that this
    project has no use for (together about 5 s of every run, more than a warm evaluation):

    - it runs `dbt --version` (2.5 s) to learn the version: the dbt it runs is the one installed
      beside this Python (`dbt_executable`), whose version the package metadata gives;
    - it loads the dbt project and adapter in this process, for `fetch_row_counts` and
      `fetch_column_metadata`, which the assets do not call (they read counts from the warehouse).

    And dbt runs in the run's own process (`in_process`, `pipelines/defs/dbt_in_process.py`), not
    in a new Python that imports dbt again (about 3 s of CPU a command).
    """

    # The engine's settings as `AUDIENCES_*` variables, for dbt's profile (`AUDIENCES_DUCKDB`:
    # the environment's own warehouse) and the models; dagster-dbt hands dbt this process's.
    variables: dict[str, str] = Field(default_factory=dict)
    in_process: bool = Field(
        default=True, description="run dbt in this process (dbtRunner), not in a subprocess"
    )

    @cached_property
    def _cli_version(self) -> Version:
        return Version(version("dbt-core"))

    def _initialize_dbt_core_adapter(self, args):
        return None

    def cli(self, *args, **kwargs):
        """dagster-dbt's `cli`, with `variables` in the environment dbt starts in."""
        running = dbt_in_this_process() if self.in_process else contextlib.nullcontext()
        with environment_set(self.variables), running:
            return super().cli(*args, **kwargs)  # dbt has started (in process: finished)


def run_trigger(tags: dict[str, str]) -> str:
    """What started a run, from its tags: a sensor, a schedule, `audiences run`, or the UI."""
    if tags.get("dagster/sensor_name"):
        return f"sensor {tags['dagster/sensor_name']}"
    if tags.get("dagster/schedule_name"):
        return f"schedule {tags['dagster/schedule_name']}"
    return tags.get("audiences/launched_by") or "launched by hand"


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB warehouse file that sources load into and dbt builds audiences in.

    A run that uses it holds the warehouse's writer lock from its start to its end
    (`audiences/warehouse/lock.py`): a second run, whether `audiences run`, a sensor's or a schedule's,
    waits for the first, and says in its log which run it waits for."""

    duckdb_path: str

    @contextmanager
    def yield_for_execution(self, context: dg.InitResourceContext):
        with self.held_for_run(context):
            yield self

    @contextmanager
    def held_for_run(self, context: dg.InitResourceContext):
        """The writer lock, held for the run `context` initializes this resource for."""
        run = context.dagster_run
        holder = (
            {"run_id": run.run_id, "job": run.job_name, "trigger": run_trigger(run.tags)}
            if run
            else {}
        )
        with hold_writer_lock(Path(self.duckdb_path), holder, report=context.log.warning):
            yield

    def connect(self, read_only: bool = False):
        return connect(self.duckdb_path, read_only=read_only)


class MembershipStoreResource(dg.ConfigurableResource):
    """The operational membership store (SQLite in WAL mode by default, or PostgreSQL)."""

    url: str

    def open(self):
        from audiences.store.database import MembershipStore

        return MembershipStore(self.url).create()


# The engine's settings (`audiences.settings.Settings`, read from `AUDIENCES_*` when the code
# location loads) as a resource: assets and ops take `settings: SettingsParam`.
SettingsParam = dg.ResourceParam[Settings]


# The tag naming the environment a run works in: every job of an environment carries it.
ENVIRONMENT_TAG = "audiences/environment"


def dagster_name(environment: str) -> str:
    """An environment's name as Dagster accepts it in names and asset keys (`[A-Za-z0-9_]`)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", environment)


@dataclass(frozen=True)
class EnvironmentNames:
    """How one environment's assets, ops, groups, jobs, schedules and sensors are named in the
    code location. The first environment (development, where analysts work) keeps the names it
    always had (`users`, `audiences/power_users`, `audiences_job`), so its history and run
    configuration stay; each later one is prefixed with its name (`production/users`,
    `production/audiences/power_users`, `production__audiences_job`, group `production_audiences`)."""

    environment: str | None = None
    prefix: tuple[str, ...] = ()

    @classmethod
    def of(cls, settings: Settings) -> "EnvironmentNames":
        first = settings.environment == settings.development_environment
        return cls(settings.environment, () if first else (dagster_name(settings.environment),))

    def key(self, *path: str) -> dg.AssetKey:
        return dg.AssetKey([*self.prefix, *path])

    def prefixed(self, key: dg.AssetKey) -> dg.AssetKey:
        return dg.AssetKey([*self.prefix, *key.path])

    def name(self, name: str) -> str:
        """An op, job, schedule or sensor name (Dagster's own `prefix__name` for prefixed keys)."""
        return "__".join([*self.prefix, name])

    def group(self, group: str) -> str:
        return "_".join([*self.prefix, group])

    @property
    def tags(self) -> dict[str, str]:
        return {ENVIRONMENT_TAG: self.environment} if self.environment else {}


def run_environment(context: dg.InitResourceContext, served: list[str], settings: Settings) -> str:
    """The environment a run works in: its `audiences/environment` tag (every environment's jobs
    carry it), else the environment of the assets it selects (a run started from the asset
    graph), else the first environment served. A run over two environments' assets is refused."""
    run = context.dagster_run
    if run is None:
        return served[0]
    tagged = run.tags.get(ENVIRONMENT_TAG)
    if not tagged:
        later = {
            dagster_name(name): name
            for name in settings.environments
            if name != settings.development_environment
        }
        first = settings.development_environment
        keys = [
            *(run.asset_selection or ()),
            *(c.asset_key for c in run.asset_check_selection or ()),
        ]
        found = {later.get(key.path[0], first) if len(key.path) > 1 else first for key in keys}
        if len(found) > 1:
            raise dg.Failure(
                f"a run works in one environment, and this one selects assets of "
                f"{', '.join(sorted(found))}: select the assets of one environment"
            )
        tagged = found.pop() if found else served[0]
    if tagged not in served:
        raise dg.Failure(
            f"this code location does not serve the environment {tagged!r} (it serves "
            f"{', '.join(served)})"
        )
    return tagged


def environment_resources(
    environments: Mapping[str, Settings], definition_sets: Mapping[str, object]
) -> dict[str, dg.ResourceDefinition]:
    """The resources every asset takes (`settings`, `warehouse`, `store`, `dbt`,
    `definition_set`), each the one of the run's environment (`run_environment`): so one asset
    function serves every environment, and a run never touches another environment's warehouse,
    store or dbt project. `definition_sets` holds the definitions each environment loaded with."""
    served = list(environments)
    any_settings = next(iter(environments.values()))

    def chosen(context: dg.InitResourceContext) -> Settings:
        return environments[run_environment(context, served, any_settings)]

    @dg.resource(
        description="The engine's settings (`audiences.settings`) of the run's environment."
    )
    def settings(context: dg.InitResourceContext) -> Settings:
        return chosen(context)

    @dg.resource(
        description="The DuckDB warehouse of the run's environment; the run holds its writer lock."
    )
    def warehouse(context: dg.InitResourceContext):
        resource = WarehouseResource(duckdb_path=str(chosen(context).duckdb_path))
        with resource.held_for_run(context):
            yield resource

    @dg.resource(description="The membership store of the run's environment.")
    def store(context: dg.InitResourceContext) -> MembershipStoreResource:
        from audiences.api.keys import refuse_other_environment

        settings = chosen(context)
        # A store recorded as another environment's (a stray AUDIENCES_STORE_URL) is refused
        # before the run writes to it, as the CLI and the API refuse it.
        refuse_other_environment(settings.store_url, settings.environment)
        return MembershipStoreResource(url=settings.store_url)

    @dg.resource(
        description="The dbt project of the run's environment, run by the dbt beside this Python."
    )
    def dbt(context: dg.InitResourceContext) -> DbtResource:
        # The dbt beside this Python, so the tool works from a virtualenv that is not activated.
        settings = chosen(context)
        project = str(settings.dbt_project_dir)
        return DbtResource(
            project_dir=project,
            profiles_dir=project,
            dbt_executable=dbt_executable(),
            variables=settings.environment_variables(),
        )

    @dg.resource(description="The audience definitions the run's environment loaded with.")
    def definition_set(context: dg.InitResourceContext):
        environment = chosen(context).environment
        if environment not in definition_sets:
            raise dg.Failure(f"{environment} has no definitions to evaluate yet")
        return definition_sets[environment]

    return {
        "settings": settings,
        "warehouse": warehouse,
        "store": store,
        "dbt": dbt,
        "definition_set": definition_set,
    }
