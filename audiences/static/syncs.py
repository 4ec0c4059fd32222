"""Warehouse syncs (reverse ETL, built in): a static audience fed by a table or query.

Declared in `data/syncs.yml`:

```yaml
syncs:
  - name: vips_from_crm
    audience: vip-customers
    source: {path: crm.duckdb, query: "select account_owner as id, account_id as tenant from vips"}
    user_id_column: id        # default id
    tenant_column: tenant     # optional
    mode: mirror              # insert (adds only) or mirror (adds and removes), as Hightouch and Census
```

A sync diffs the source against what it wrote last time (kept in the store's `sync_state`), so only
changes are written, each through the static membership functions (events and triggers included).
A mirror sync that would remove more than the circuit breaker allows is held: its adds are applied,
its removals wait until a person runs `audiences release` on the batch (the next sync then applies
them) or `discard` (the sync keeps being held while the source stays that way).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import sqlalchemy as sa
import yaml

from audiences.conditions.compiler import BLANK_TENANT
from audiences.membership.changes import CircuitBreaker
from audiences.store import database as tables
from audiences.store.database import MembershipStore, now_text
from audiences.store.members import Member, change_members, require_static
from audiences.users.sources import UserSource, guess_format, read_source
from audiences.users.validation import validate_users

MODES = ("insert", "mirror")


@dataclass(frozen=True)
class Sync:
    name: str
    audience_key: str
    source: UserSource
    tenant_column: str | None = None
    mode: str = "insert"


@dataclass(frozen=True)
class SyncResult:
    name: str
    rows: int
    rejected: int
    added: int
    removed: int
    held_batch: str | None


def load_syncs(path: Path) -> list[Sync]:
    """Read `syncs.yml`; a missing file means no syncs."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(document, dict) or not isinstance(document.get("syncs") or [], list):
        raise ValueError(f"{path}: expected `syncs:` and a list of syncs")
    syncs = []
    for index, entry in enumerate(document.get("syncs") or []):
        where = f"{path}: syncs[{index}]"
        if not isinstance(entry, dict) or not all(
            entry.get(k) for k in ("name", "audience", "source")
        ):
            raise ValueError(f"{where} needs name, audience and source")
        if not isinstance(entry["source"], dict) or not entry["source"].get("path"):
            raise ValueError(f"{where}.source needs a path (and a table or query for a database)")
        mode = entry.get("mode", "insert")
        if mode not in MODES:
            raise ValueError(f"{where}: mode is insert or mirror, got {mode!r}")
        source = entry["source"]
        location = Path(source["path"])
        location = location if location.is_absolute() else (path.parent / location).resolve()
        syncs.append(
            Sync(
                name=entry["name"],
                audience_key=entry["audience"],
                mode=mode,
                tenant_column=entry.get("tenant_column"),
                source=UserSource(
                    entry["name"],
                    source.get("format") or guess_format(location),
                    location,
                    "stream",
                    table=source.get("table"),
                    query=source.get("query"),
                    id_column=entry.get("user_id_column", "id"),
                ),
            )
        )
    return syncs


def run_sync(
    store: MembershipStore,
    sync: Sync,
    audience_types: dict[str, str],
    breaker: CircuitBreaker = CircuitBreaker(),
) -> SyncResult:
    """Apply the difference between the source and the last synced state; see the module docstring."""
    require_static(sync.audience_key, audience_types)
    state = tables.sync_state
    frame = read_source(sync.source)
    if sync.tenant_column and sync.tenant_column not in frame.columns:
        raise ValueError(
            f"{sync.source.location}: no tenant column {sync.tenant_column!r} (sync {sync.name!r})"
        )
    validated = validate_users(frame.select("_row", "id"))
    good = frame.filter(pl.col("_row").is_in(validated.valid["_row"].implode()))
    tenant = (
        pl.col(sync.tenant_column).cast(pl.String)
        if sync.tenant_column
        else pl.lit(None, pl.String)
    )
    # The diff runs in polars: the source and the last synced state are a million rows each, and
    # Python sets of tuples made the reads, not the writes, the cost of a sync.
    desired = (
        good.select(pl.col("id").alias("user_id"), _normalized(tenant).alias("tenant"))
        .with_columns(pl.col("tenant").fill_null("").alias("tenant_key"))
        .unique(["user_id", "tenant_key"], keep="first", maintain_order=True)
    )
    with store.read_engine.connect() as connection:
        # Straight from the driver's cursor: SQLAlchemy's row objects cost more than the query.
        driver = connection.connection.driver_connection
        rows = driver.execute(
            f"select user_id, tenant_key from sync_state where sync_name = {store.placeholder}",
            (sync.name,),
        ).fetchall()
        # The state as stored (`stored_key`, to delete by) and normalized (a state written before
        # blank tenants were no tenant compares equal to the same member without tenant).
        last = pl.DataFrame(
            rows, schema={"user_id": pl.String, "stored_key": pl.String}, orient="row"
        ).with_columns(_normalized(pl.col("stored_key")).alias("tenant"))
        last = last.with_columns(pl.col("tenant").fill_null("").alias("tenant_key"))
    adds = desired.join(last, on=["user_id", "tenant_key"], how="anti")
    removes = (
        last.join(desired, on=["user_id", "tenant_key"], how="anti")
        if sync.mode == "mirror"
        else last.clear()
    )
    held = None
    if removes.height:
        size = store.scalar(
            sa.select(sa.func.count()).where(
                tables.audience_members.c.audience_key == sync.audience_key
            )
        )
        if breaker.trips(removes.height, size) and not _consume_release(store, sync.name):
            held = _hold(store, sync, adds.height, removes.height, size)
            removes = removes.clear()
    added = change_members(
        store,
        sync.audience_key,
        [Member(u, t) for u, t in adds.select("user_id", "tenant").iter_rows()],
        "add",
        source=f"sync:{sync.name}",
    ).changed
    removed = change_members(
        store,
        sync.audience_key,
        [Member(u, t) for u, t in removes.select("user_id", "tenant").iter_rows()],
        "remove",
        source=f"sync:{sync.name}",
    ).changed
    with store.engine.begin() as connection:
        store.insert_rows(
            connection,
            state,
            ("sync_name", "user_id", "tenant_key"),
            [(sync.name, u, t) for u, t in adds.select("user_id", "tenant_key").iter_rows()],
        )
        if removes.height:
            mark = store.placeholder
            connection.exec_driver_sql(
                f"delete from sync_state where sync_name = {mark} and user_id = {mark} and tenant_key = {mark}",
                [(sync.name, u, t) for u, t in removes.select("user_id", "stored_key").iter_rows()],
            )
    return SyncResult(sync.name, frame.height, validated.quarantined.height, added, removed, held)


def _normalized(tenant: pl.Expr) -> pl.Expr:
    """`normalize_tenant` over a column: a blank or whitespace-only tenant is null."""
    blank = tenant.str.contains(f"^(?:{BLANK_TENANT})$")
    return pl.when(blank).then(pl.lit(None, pl.String)).otherwise(tenant)


def _batch_id(sync_name: str) -> str:
    return "sync-" + hashlib.sha256(f"{sync_name}\x1f{now_text()}".encode()).hexdigest()[:26]


def _hold(store: MembershipStore, sync: Sync, adds: int, removes: int, size: int) -> str:
    batches = tables.held_batches
    existing = store.rows(
        sa.select(batches.c.batch_id).where(
            batches.c.audience_key == sync.audience_key,
            batches.c.status == "held",
            batches.c.batch_id.like("sync-%"),
        )
    )
    if existing:
        return existing[0]["batch_id"]
    batch_id = _batch_id(sync.name)
    with store.engine.begin() as connection:
        connection.execute(
            batches.insert().values(
                batch_id=batch_id,
                audience_key=sync.audience_key,
                evaluated_at=now_text(),
                entered=adds,
                exited=removes,
                audience_size=size,
                status="held",
                decided_at=None,
            )
        )
    return batch_id


def _consume_release(store: MembershipStore, sync_name: str) -> bool:
    """A released sync batch lets the next sync remove once; it is then marked applied."""
    batches = tables.held_batches
    with store.engine.begin() as connection:
        released = (
            connection.execute(
                sa.select(batches.c.batch_id).where(
                    batches.c.batch_id.like("sync-%"), batches.c.status == "released"
                )
            )
            .scalars()
            .all()
        )
        for batch_id in released:
            connection.execute(
                batches.update().where(batches.c.batch_id == batch_id).values(status="applied")
            )
        return bool(released)
