"""Static audiences: their members, kept in the membership store, copied into the warehouse."""

import dagster as dg

from audiences.definitions import load_definitions
from audiences.membership.static import audience_types, copy_to_warehouse
from audiences.settings import Settings
from pipelines.defs.resources import MembershipStoreResource, WarehouseResource


@dg.definitions
def static_definitions() -> dg.Definitions:
    settings = Settings.from_env()

    @dg.asset(
        key="static_audience_members",
        group_name="users",
        kinds={"duckdb"},
        description=(
            "Members of static audiences (added by CSV upload, warehouse syncs, the API or by hand), "
            "copied from the membership store into `raw.static_audience_members`, so static audience "
            "models and `is_audience_member` conditions can read them."
        ),
    )
    def static_audience_members(warehouse: WarehouseResource, store: MembershipStoreResource) -> dg.MaterializeResult:
        opened = store.open()
        types = audience_types(opened, load_definitions(settings.definitions_dir))
        with warehouse.connect() as connection:
            copied = copy_to_warehouse(connection, opened, [key for key, kind in types.items() if kind == "static"])
        return dg.MaterializeResult(metadata={"dagster/row_count": copied})

    return dg.Definitions(assets=[static_audience_members])
