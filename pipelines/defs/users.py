"""Users in: one external asset per declared source, and the `users` store they load into."""

from datetime import UTC, datetime

import dagster as dg
from pydantic import Field

from audiences.settings import Settings
from audiences.store.profiles import load_identify_queue, publish_changed_users
from audiences.store.tenants import load_tenant_queue
from audiences.users import (
    configured_sources,
    configured_tenant_sources,
    load_source,
    missing_memberships,
    missing_memberships_report,
)
from audiences.users.store import settle_run
from pipelines.defs.resources import MembershipStoreResource, SettingsParam, WarehouseResource

SOURCE_KINDS = {
    "csv": "csv",
    "parquet": "parquet",
    "jsonl": "json",
    "duckdb": "duckdb",
    "sqlite": "sqlite",
}


class UsersConfig(dg.Config):
    """What the `users` asset loads: the declared sources, then the identify queue."""

    load_sources: bool = Field(
        default=True,
        description="Read every declared source; false loads only the identify calls queued in the "
        "store (the scheduled re-evaluation: the sources are watched by a sensor).",
    )


def source_asset_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["sources", name])


@dg.asset(
    key="users",
    # Uploads queue identify calls, which this asset loads; `users_definitions` adds the sources.
    deps=[dg.AssetKey("static_audience_uploads")],
    group_name="users",
    kinds={"duckdb"},
    description=(
        "The user store (`raw.users`): every source's rows upserted by id, properties deep-merged "
        "the way Knock's identify does (`null` removes a property). Snapshot sources delete the "
        "users they no longer hold. Rows with a missing or malformed id, or an unreadable field, "
        "go to `raw.users_quarantine` with the reason. A source's rows that did not change "
        "since its last load change nothing, so newer identify calls stay. Identify calls "
        "queued in the store (the API, uploads) apply last. Tenants and tenant memberships "
        "(sources.yml `tenants:`, `tenant_memberships:`, and the API's tenant writes) load after "
        "the users by the same rules into `raw.tenants` and `raw.tenant_memberships`."
    ),
)
def users(
    context: dg.AssetExecutionContext,
    config: UsersConfig,
    warehouse: WarehouseResource,
    store: MembershipStoreResource,
    settings: SettingsParam,
) -> dg.MaterializeResult:
    loaded_at = datetime.now(UTC)
    sources = configured_sources(settings)
    if config.load_sources:
        sources += configured_tenant_sources(settings)
    metadata: dict = {"sources_loaded": config.load_sources}
    with warehouse.connect() as connection:
        for source in sources if config.load_sources else []:
            result = load_source(connection, source, loaded_at)
            context.log.info(f"{source.name}: {result}")
            for key, value in result.as_metadata().items():
                metadata[f"{source.name}/{key}"] = value
            if result.rows_quarantined:
                table = {"users": "users", "tenants": "tenants"}.get(
                    source.kind, "tenant_memberships"
                )
                context.log.warning(
                    f"{source.name}: {result.rows_quarantined} rows quarantined; see raw.{table}_quarantine"
                )
        # Identify calls queued in the store (API, uploads) apply after the sources, as the newest.
        membership_store = store.open()
        identified = load_identify_queue(connection, membership_store, loaded_at)
        for key, value in identified.as_metadata().items():
            metadata[f"identify_queue/{key}"] = value
        for key, value in (
            load_tenant_queue(connection, membership_store, loaded_at).as_metadata().items()
        ):
            metadata[f"tenant_queue/{key}"] = value
        metadata.update(missing_memberships(connection))
        report = missing_memberships_report(connection)
        if report:
            context.log.warning(report)
            metadata["memberships_missing_sample"] = report
        # Users the run changed and changed back (sources that disagree) keep their updated_at.
        metadata["users_changed_back"] = settle_run(connection, loaded_at)
        # The API reads users from the store, which stays available while a run holds DuckDB.
        metadata["profiles_published"] = publish_changed_users(membership_store, connection)
        total, quarantined = connection.execute(
            "select (select count(*) from raw.users where deleted_at is null), "
            "(select count(*) from raw.users_quarantine)"
        ).fetchone()
        reasons = connection.execute(
            "select source_name, row_number, coalesce(user_id, '(none)'), reason "
            "from raw.users_quarantine order by source_name, row_number limit 20"
        ).fetchall()
    metadata["dagster/row_count"] = total
    metadata["quarantined_rows"] = quarantined
    if reasons:
        lines = ["| source | row | id | reason |", "|---|---|---|---|"]
        lines += [f"| {s} | {r} | {i!r} | {why} |" for s, r, i, why in reasons]
        metadata["quarantine_sample"] = dg.MetadataValue.md("\n".join(lines))
    return dg.MaterializeResult(metadata=metadata)


@dg.asset_check(
    asset=users, description="Every user id appears once in the user store.", blocking=True
)
def users_have_unique_ids(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    with warehouse.connect(read_only=True) as connection:
        duplicates = connection.execute(
            "select count(*) from (select user_id from raw.users group by user_id having count(*) > 1)"
        ).fetchone()[0]
    return dg.AssetCheckResult(passed=duplicates == 0, metadata={"duplicate_ids": duplicates})


def users_definitions(settings: Settings) -> dg.Definitions:
    """One external asset per source declared when the code location loads, and `users` after
    them (an environment's; `pipelines/defs/environments.py` names them for it)."""
    sources = configured_sources(settings) + configured_tenant_sources(settings)
    source_specs = [
        dg.AssetSpec(
            key=source_asset_key(source.name),
            description=f"User source `{source.name}`: {source.description}.",
            group_name="sources",
            kinds={SOURCE_KINDS[source.format]},
            metadata={"location": str(source.location), "mode": source.mode},
        )
        for source in sources
    ]
    # `users` reads every declared source: each is an upstream asset.
    users_after_sources = users.map_asset_specs(
        lambda spec: spec.merge_attributes(deps=[source.key for source in source_specs])
    )
    # The `users` step also writes the tenants and tenant memberships (sources.yml `tenants:` and
    # `tenant_memberships:`, and the API's tenant queue), which per-tenant audiences read.
    tenant_tables = [
        dg.AssetSpec(
            key=name,
            description=description,
            group_name="users",
            kinds={"duckdb"},
            deps=[dg.AssetKey("users")],
        )
        for name, description in (
            (
                "tenants",
                "Knock's tenants (`raw.tenants`), one row per tenant id, written by the `users` "
                "step after the users: sources.yml `tenants:` and the API's `PUT /v1/tenants/{id}`.",
            ),
            (
                "tenant_memberships",
                "Which users belong to which tenants (`raw.tenant_memberships`), with each "
                "membership's properties, written by the `users` step: sources.yml "
                "`tenant_memberships:`.",
            ),
        )
    ]
    return dg.Definitions(
        assets=[*source_specs, users_after_sources, *tenant_tables],
        asset_checks=[users_have_unique_ids],
    )
