"""Bulk identify and bulk delete of users, as Knock's `POST /v1/users/bulk/...`: queued, then
processed by a worker, reported as a `BulkOperation`.

A request is validated as a whole (at most 1,000 items, each item's shape) and queued in the
store's `bulk_operations` table in one transaction, and the answer is the operation, `queued`.
Each API process runs one `BulkWorker` thread per environment. It claims the oldest queued
operation with a lease (`claimed_by`, `claimed_until`; an operation whose worker died is claimed
again when its lease ends), and processes its items a chunk at a time, each chunk in one write
transaction with its progress (`processed_rows`, `success_count`, `error_count`,
`error_items`), so `GET /v1/bulk_operations/{id}` shows it move. An item that cannot be applied
(properties over 256 kB, NaN, an id Knock refuses) is an error item naming its id; the others go
in. A chunk is applied once: the progress it writes is in its own transaction, and a worker that
takes over resumes after the last committed chunk. A chunk whose transaction fails (the store
refused it) is retried; after three failures in a row the operation is `failed`, with
`failed_at`, and what its earlier chunks applied stays applied, as `processed_rows` says.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from audiences.api.errors import ApiError, not_found
from audiences.api.identifiers import id_problem
from audiences.store import database as tables
from audiences.store import profiles
from audiences.store.database import now_text

log = logging.getLogger("audiences.api.bulk")

MAX_ITEMS = 1000  # Knock's limit per bulk request
CHUNK = 100  # items per write transaction: progress moves at least this often
LEASE = timedelta(seconds=60)
MAX_ATTEMPTS = 3  # a chunk that fails this many times in a row fails its operation
OPERATIONS = {"users.identify", "users.delete"}


def bulk_operation(row: dict) -> dict:
    """Knock's `BulkOperation` shape."""
    return {
        "__typename": "BulkOperation",
        "id": row["operation_id"],
        "name": row["name"],
        "status": row["status"],
        "estimated_total_rows": row["estimated_total_rows"],
        "processed_rows": row["processed_rows"],
        "success_count": row["success_count"],
        "error_count": row["error_count"],
        "error_items": json.loads(row["error_items"]),
        "progress_path": f"/v1/bulk_operations/{row['operation_id']}",
        "inserted_at": row["inserted_at"],
        "updated_at": row["updated_at"],
        "started_at": row["started_at"],
        "completed_at": row["completed_at"],
        "failed_at": row["failed_at"],
    }


def queue_operation(environment, name: str, items: list, claim=None) -> dict:
    """Queue a bulk operation (its items as given) in the environment's store; returns it."""
    if name not in OPERATIONS:
        raise ValueError(name)
    stamp = now_text()
    row = {
        "operation_id": str(uuid.uuid4()),
        "name": name,
        "status": "queued",
        "items": json.dumps(items, ensure_ascii=False, separators=(",", ":")),
        "estimated_total_rows": len(items),
        "processed_rows": 0,
        "success_count": 0,
        "error_count": 0,
        "error_items": "[]",
        "claimed_by": None,
        "claimed_until": None,
        "inserted_at": stamp,
        "updated_at": stamp,
        "started_at": None,
        "completed_at": None,
        "failed_at": None,
    }

    def work(connection):
        connection.execute(tables.bulk_operations.insert().values(**row))
        return bulk_operation(row)

    answer = environment.write(work, claim)
    worker = getattr(environment, "bulk_worker", None)
    if worker is not None:
        worker.wake()
    return answer


def get_operation(store, operation_id: str) -> dict:
    table = tables.bulk_operations
    rows = store.rows(
        sa.select(*[column for column in table.c if column.name != "items"]).where(
            table.c.operation_id == operation_id
        )
    )
    if not rows:
        raise not_found(f"bulk operation {operation_id!r}")
    return bulk_operation(rows[0])


class BulkWorker:
    """The thread that processes an environment's queued bulk operations (one per API process;
    the lease keeps two processes from working on one operation)."""

    def __init__(self, environment):
        self.environment = environment
        self.name = f"bulk-{environment.name}-{uuid.uuid4().hex[:8]}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._failures: dict[str, int] = {}

    def start(self) -> BulkWorker:
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.process_next()
            except Exception:  # a failing store must not end the thread; the next pass retries
                log.exception("bulk operation worker failed")
                worked = False
            if not worked:
                self._wake.wait(timeout=1.0)
                self._wake.clear()

    def process_next(self) -> bool:
        """Claim and process one operation; False when none was waiting."""
        operation = self._claim()
        if operation is None:
            return False
        items = json.loads(operation["items"])
        position = operation["processed_rows"]
        operation_id = operation["operation_id"]
        try:
            while position < len(items) and not self._stop.is_set():
                chunk = items[position : position + CHUNK]
                self._apply(operation, chunk, position + len(chunk))
                position += len(chunk)
                self._failures.pop(operation_id, None)
        except LostLease:
            return True
        except Exception:
            # The chunk's transaction rolled back: nothing of it is applied. Retried from there,
            # and after MAX_ATTEMPTS failures in a row the operation is `failed`.
            log.exception("bulk operation %s failed at item %d", operation_id, position)
            failures = self._failures[operation_id] = self._failures.get(operation_id, 0) + 1
            self._release(operation_id, failed=failures >= MAX_ATTEMPTS)
            self._stop.wait(0.2 * failures)  # a store that is briefly unavailable gets time
            return True
        if position >= len(items):
            self._finish(operation["operation_id"])
        return True

    def _claim(self) -> dict | None:
        table = tables.bulk_operations
        store = self.environment.store
        now = datetime.now(UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        candidates = store.rows(
            sa.select(table.c.operation_id)
            .where(
                (table.c.status == "queued")
                | ((table.c.status == "processing") & (table.c.claimed_until < stamp))
            )
            .order_by(table.c.inserted_at)
            .limit(5)
        )
        until = (now + LEASE).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        for candidate in candidates:
            operation_id = candidate["operation_id"]

            def claim(connection, operation_id=operation_id):
                # Conditional: only one worker's update finds the row still claimable.
                claimed = connection.execute(
                    table.update()
                    .where(
                        table.c.operation_id == operation_id,
                        (table.c.status == "queued")
                        | ((table.c.status == "processing") & (table.c.claimed_until < stamp)),
                    )
                    .values(
                        status="processing",
                        claimed_by=self.name,
                        claimed_until=until,
                        started_at=sa.func.coalesce(table.c.started_at, stamp),
                        updated_at=stamp,
                    )
                ).rowcount
                if not claimed:
                    return None
                return dict(
                    connection.execute(sa.select(table).where(table.c.operation_id == operation_id))
                    .one()
                    ._mapping
                )

            operation = self.environment.write(claim)
            if operation is not None:
                return operation
        return None

    def _apply(self, operation: dict, chunk: list, processed: int) -> None:
        """Apply one chunk of items and record the progress, in one transaction."""
        table = tables.bulk_operations
        errors: list[dict] = []
        valid = []
        for item in chunk:
            problem = self._problem(operation["name"], item)
            if problem:
                errors.append({"id": _item_id(item), "message": problem})
            else:
                valid.append(item)
        environment = self.environment
        until = (datetime.now(UTC) + LEASE).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

        def work(connection):
            if operation["name"] == "users.identify":
                patches = [(item["id"], profiles.user_properties(item)) for item in valid]
                profiles.identify(environment.store, connection, patches)
            else:
                for user_id in valid:
                    environment.delete_user_in(connection, user_id, missing_ok=True)
            current = connection.execute(
                sa.select(table.c.error_items, table.c.claimed_by).where(
                    table.c.operation_id == operation["operation_id"]
                )
            ).one()
            if current.claimed_by != self.name:
                raise LostLease()
            connection.execute(
                table.update()
                .where(table.c.operation_id == operation["operation_id"])
                .values(
                    processed_rows=processed,
                    success_count=table.c.success_count + len(valid),
                    error_count=table.c.error_count + len(errors),
                    error_items=json.dumps(json.loads(current.error_items) + errors),
                    claimed_until=until,
                    updated_at=now_text(),
                )
            )

        environment.write(work)
        # Real time: the users identified or deleted are evaluated at once.
        environment.identified(
            item["id"] if operation["name"] == "users.identify" else item for item in valid
        )

    def _problem(self, name: str, item: object) -> str | None:
        from audiences.api.service import check_properties

        if name == "users.delete":
            return id_problem(item)
        if not isinstance(item, dict):
            return "a user is an object with an id"
        problem = id_problem(item.get("id"))
        if problem:
            return problem
        try:
            check_properties(profiles.user_properties(item))
        except ApiError as error:
            return error.message
        return None

    def _release(self, operation_id: str, failed: bool) -> None:
        """Give the operation back to be retried now, or mark it failed."""
        table = tables.bulk_operations
        stamp = now_text()
        values = (
            {"status": "failed", "failed_at": stamp, "claimed_until": None, "items": "[]"}
            if failed
            else {"status": "queued", "claimed_by": None, "claimed_until": None}
        )
        self.environment.write(
            lambda connection: connection.execute(
                table.update()
                .where(table.c.operation_id == operation_id, table.c.claimed_by == self.name)
                .values(updated_at=stamp, **values)
            )
        )

    def _finish(self, operation_id: str) -> None:
        table = tables.bulk_operations
        stamp = now_text()
        self.environment.write(
            lambda connection: connection.execute(
                table.update()
                .where(table.c.operation_id == operation_id, table.c.claimed_by == self.name)
                .values(
                    status="completed",
                    completed_at=stamp,
                    updated_at=stamp,
                    claimed_until=None,
                    items="[]",  # done: the items need not be kept
                )
            )
        )


class LostLease(Exception):
    """Another worker took the operation over (this one's lease ended): stop, write nothing."""


def _item_id(item: object) -> str:
    if isinstance(item, dict):
        return str(item.get("id"))
    return str(item)
