"""Static audiences: uploads dropped in a folder, warehouse syncs, manual changes, and the copy
of static memberships into the warehouse."""

import shutil
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from audiences.dbt.project import project_definitions
from audiences.membership.changes import CircuitBreaker
from audiences.settings import Settings
from audiences.static.syncs import load_syncs, run_sync
from audiences.static.uploads import UploadError, upload_csv
from audiences.store.members import (
    Member,
    audience_types,
    change_members,
    copy_to_warehouse,
    require_static,
)
from pipelines.defs.resources import (
    EnvironmentNames,
    MembershipStoreResource,
    SettingsParam,
    WarehouseResource,
)


class MembershipChangeConfig(dg.Config):
    """Add or remove one member of a static audience (the same as `audiences add` / `remove`)."""

    audience: str
    user_id: str
    tenant: str | None = None
    action: str = "add"


UPLOADS_FOLDER = "uploads"  # beside the definitions folder


def uploads_dir(settings: Settings) -> Path:
    """Where CSV files dropped for static audiences wait: `uploads/<audience_key>/*.csv`."""
    return settings.definitions_dir.parent / UPLOADS_FOLDER


def types(settings: Settings, store) -> dict[str, str]:
    """Every audience's type; a broken definition elsewhere must not stop uploads. The folder as
    a run reads it (`project_definitions`): files `generate` compiled are not compiled again."""
    return audience_types(store, project_definitions(settings).definitions)


@dg.asset(
    key="static_audience_uploads",
    group_name="static_audiences",
    kinds={"csv"},
    description=(
        f"CSV files dropped in `{UPLOADS_FOLDER}/<audience_key>/` are uploaded into that static "
        "audience: users upserted, members added (a `tenant_id` column gives each membership's "
        "tenant), rows with a missing or malformed id skipped and written to a rejects file. "
        "Processed files move to `processed/`."
    ),
)
def static_audience_uploads(
    context: dg.AssetExecutionContext, store: MembershipStoreResource, settings: SettingsParam
) -> dg.MaterializeResult:
    opened = store.open()
    known = types(settings, opened)
    files = sorted(
        path
        for path in uploads_dir(settings).glob("*/*.csv")
        if not path.name.endswith(".rejects.csv")
    )
    rows, metadata = [], {"files": len(files)}
    for path in files:
        audience = path.parent.name
        done = path.parent / "processed"
        done.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        target = done / f"{stamp}-{path.name}"
        try:
            # Dropped files name their tenant column the Knock way: `tenant_id` (or `tenant`).
            header = (
                path.read_bytes()[:4096]
                .decode("utf-8", "replace")
                .lstrip("\ufeff")
                .splitlines()[:1]
            )
            columns = (
                {c.strip().strip('"') for c in header[0].replace(";", ",").split(",")}
                if header
                else set()
            )
            tenant_column = next((c for c in ("tenant_id", "tenant") if c in columns), None)
            result = upload_csv(
                opened,
                audience,
                path,
                known,
                tenant_column=tenant_column,
                max_bytes=settings.upload_max_bytes,
                rejects_file=done / f"{stamp}-{path.stem}.rejects.csv",
            )
            rows.append(
                f"| {path.name} | {audience} | {result.members_added} | {result.rejected} | |"
            )
        except (UploadError, ValueError) as error:
            context.log.error(f"{path}: {error}")
            rows.append(f"| {path.name} | {audience} | 0 | 0 | {error} |")
            target = done / f"{stamp}-refused-{path.name}"
        shutil.move(str(path), target)
    if rows:
        metadata["uploads"] = dg.MetadataValue.md(
            "| file | audience | added | rejected | refused |\n|---|---|---|---|---|\n"
            + "\n".join(rows)
        )
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    key="static_audience_syncs",
    group_name="static_audiences",
    kinds={"python"},
    description=(
        "Warehouse syncs (`syncs.yml`): static audiences fed by a table or query, in insert or "
        "mirror mode. Each sync writes only the difference from what it wrote last time; a mirror "
        "sync that would remove too many members is held for a person to release."
    ),
)
def static_audience_syncs(
    context: dg.AssetExecutionContext, store: MembershipStoreResource, settings: SettingsParam
) -> dg.MaterializeResult:
    opened = store.open()
    breaker = CircuitBreaker(settings.breaker_share, settings.breaker_minimum)
    rows, held = [], []
    for sync in load_syncs(settings.syncs_file):
        result = run_sync(opened, sync, types(settings, opened), breaker)
        rows.append(
            f"| {result.name} | {result.rows} | {result.added} | {result.removed} | {result.rejected} |"
        )
        if result.held_batch:
            held.append(result.held_batch)
            context.log.warning(
                f"{sync.name}: removals held as {result.held_batch}; `audiences release` it"
            )
    return dg.MaterializeResult(
        metadata={
            "syncs": dg.MetadataValue.md(
                "| sync | rows | added | removed | rejected |\n|---|---|---|---|---|\n"
                + "\n".join(rows)
            )
            if rows
            else "none",
            "held_batches": held,
        }
    )


@dg.asset(
    key="static_audience_members",
    deps=[static_audience_uploads, static_audience_syncs],
    group_name="static_audiences",
    kinds={"duckdb"},
    description=(
        "Members of static audiences (added by CSV upload, warehouse syncs, the API or by hand), "
        "copied from the membership store into `raw.static_audience_members`, so static audience "
        "models and `is_audience_member` conditions can read them."
    ),
)
def static_audience_members(
    warehouse: WarehouseResource, store: MembershipStoreResource, settings: SettingsParam
) -> dg.MaterializeResult:
    opened = store.open()
    with warehouse.connect() as connection:
        copied = copy_to_warehouse(
            connection,
            opened,
            [key for key, kind in types(settings, opened).items() if kind == "static"],
        )
    return dg.MaterializeResult(metadata={"dagster/row_count": copied})


@dg.op(description="Add or remove one member of a static audience, recording the event.")
def change_static_membership(
    context: dg.OpExecutionContext,
    config: MembershipChangeConfig,
    store: MembershipStoreResource,
    settings: SettingsParam,
) -> None:
    if config.action not in ("add", "remove"):
        raise dg.Failure(f"action is add or remove, not {config.action!r}")
    opened = store.open()
    require_static(config.audience, types(settings, opened))
    result = change_members(
        opened,
        config.audience,
        [Member(config.user_id, config.tenant)],
        config.action,
        source="dagster",
    )
    context.log.info(
        f"{config.action} {config.user_id} ({config.tenant or 'no tenant'}) in {config.audience}: "
        f"{'changed' if result.changed else 'no change'}"
    )


def static_member_job(names: EnvironmentNames) -> dg.JobDefinition:
    """An environment's job that adds or removes one member of a static audience."""

    @dg.job(
        name=names.name("change_static_audience_member"),
        description="Add or remove a member of a static audience from the UI (like "
        f"`audiences add`){f' in {names.environment}' if names.environment else ''}.",
        tags=names.tags,
    )
    def change_static_audience_member():
        change_static_membership()

    return change_static_audience_member


change_static_audience_member = static_member_job(EnvironmentNames())
