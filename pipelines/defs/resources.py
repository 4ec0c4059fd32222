"""Resources: the DuckDB warehouse and the dbt CLI, both located by `audiences.settings`."""

from contextlib import contextmanager
from functools import cached_property
from importlib.metadata import version
from pathlib import Path

import dagster as dg
from dagster_dbt import DbtCliResource
from packaging.version import Version

from audiences.dbt.project import dbt_executable
from audiences.settings import Settings
from audiences.warehouse.lock import hold_writer_lock
from audiences.warehouse.queries import connect


class DbtResource(DbtCliResource):
    """dagster-dbt's dbt CLI resource, without two steps it takes before each dbt command that this
    project has no use for (together about 5 s of every run, more than a warm evaluation):

    - it runs `dbt --version` (2.5 s) to learn the version: the dbt it runs is the one installed
      beside this Python (`dbt_executable`), whose version the package metadata gives;
    - it loads the dbt project and adapter in this process, for `fetch_row_counts` and
      `fetch_column_metadata`, which the assets do not call (they read counts from the warehouse).
    """

    @cached_property
    def _cli_version(self) -> Version:
        return Version(version("dbt-core"))

    def _initialize_dbt_core_adapter(self, args):
        return None


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
        run = context.dagster_run
        holder = (
            {"run_id": run.run_id, "job": run.job_name, "trigger": run_trigger(run.tags)}
            if run
            else {}
        )
        with hold_writer_lock(Path(self.duckdb_path), holder, report=context.log.warning):
            yield self

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


@dg.definitions
def resources() -> dg.Definitions:
    """The resources every asset takes, made from the settings each time the code location loads
    (the assets themselves are module-level objects)."""
    settings = Settings.from_env()
    return dg.Definitions(
        resources={
            "settings": settings,
            "warehouse": WarehouseResource(duckdb_path=str(settings.duckdb_path)),
            "store": MembershipStoreResource(url=settings.store_url),
            # The dbt beside this Python, so the tool works from a virtualenv that is not activated.
            "dbt": DbtResource(
                project_dir=str(settings.dbt_project_dir),
                profiles_dir=str(settings.dbt_project_dir),
                dbt_executable=dbt_executable(),
            ),
        }
    )
