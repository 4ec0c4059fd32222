"""Events in: one external asset per declared event source, and the `events` table they load into."""

from datetime import UTC, datetime

import dagster as dg

from audiences.events.loading import configured_event_sources, load_event_source
from audiences.settings import Settings
from pipelines.defs.resources import WarehouseResource

EVENT_SOURCE_KINDS = {"jsonl": "json", "parquet": "parquet", "duckdb": "duckdb"}


def event_source_asset_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["event_sources", name])


def events_definitions(settings: Settings) -> dg.Definitions:
    """One external asset per event source the settings declare, and `events` after them."""
    sources = configured_event_sources(settings)
    source_specs = [
        dg.AssetSpec(
            key=event_source_asset_key(source.name),
            description=f"Event source `{source.name}`: {source.description}.",
            group_name="sources",
            kinds={EVENT_SOURCE_KINDS[source.format]},
            metadata={"location": str(source.location), "columns": source.columns},
        )
        for source in sources
    ]

    @dg.asset(
        key="events",
        deps=[spec.key for spec in source_specs],
        group_name="users",
        kinds={"duckdb"},
        description=(
            "Tracked events (`raw.events`), append-only, which event conditions count. Each load "
            "reads only what is new: files not loaded before, table rows past the source's "
            "ingestion-time watermark. A message id seen before is counted once; a row without a "
            "user id, event name, message id or ISO 8601 timestamp goes to "
            "`raw.events_quarantine` with the reason. Events of users not loaded yet are kept."
        ),
    )
    def events(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        loaded_at = datetime.now(UTC)
        metadata: dict = {}
        with warehouse.connect() as connection:
            for source in sources:
                result = load_event_source(connection, source, loaded_at)
                context.log.info(f"{source.name}: {result}")
                for key, value in result.as_metadata().items():
                    metadata[f"{source.name}/{key}"] = value
                if result.rows_quarantined:
                    context.log.warning(
                        f"{source.name}: {result.rows_quarantined} rows quarantined; see raw.events_quarantine"
                    )
            from audiences.events.loading import ensure_event_schema

            ensure_event_schema(connection)
            total, quarantined = connection.execute(
                "select (select count(*) from raw.events), (select count(*) from raw.events_quarantine)"
            ).fetchone()
            reasons = connection.execute(
                "select source_name, row_number, reason from raw.events_quarantine "
                "order by quarantined_at desc, source_name, row_number limit 20"
            ).fetchall()
        metadata["dagster/row_count"] = total
        metadata["events_quarantined"] = quarantined
        if reasons:
            lines = ["| source | row | reason |", "|---|---|---|"]
            lines += [f"| {s} | {r} | {why} |" for s, r, why in reasons]
            metadata["quarantine_sample"] = dg.MetadataValue.md("\n".join(lines))
        return dg.MaterializeResult(metadata=metadata)

    return dg.Definitions(assets=[*source_specs, events])
