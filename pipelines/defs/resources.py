"""Resources: the DuckDB warehouse and the dbt CLI, both located by `audiences.settings`."""

import dagster as dg
from dagster_dbt import DbtCliResource

from audiences.dbt_project import dbt_executable
from audiences.settings import Settings
from audiences.warehouse import connect


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB warehouse file that sources load into and dbt builds audiences in."""

    duckdb_path: str

    def connect(self, read_only: bool = False):
        return connect(self.duckdb_path, read_only=read_only)


class MembershipStoreResource(dg.ConfigurableResource):
    """The operational membership store (SQLite in WAL mode by default, or PostgreSQL)."""

    url: str

    def open(self):
        from audiences.membership.store import MembershipStore

        return MembershipStore(self.url).create()


@dg.definitions
def resources() -> dg.Definitions:
    settings = Settings.from_env()
    return dg.Definitions(
        resources={
            "warehouse": WarehouseResource(duckdb_path=str(settings.duckdb_path)),
            "store": MembershipStoreResource(url=settings.store_url),
            # The dbt beside this Python, so the tool works from a virtualenv that is not activated.
            "dbt": DbtCliResource(project_dir=str(settings.dbt_project_dir),
                                  profiles_dir=str(settings.dbt_project_dir),
                                  dbt_executable=dbt_executable()),
        }
    )
