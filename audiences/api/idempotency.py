"""`Idempotency-Key` on writes: the first 2xx answer to a key is replayed for 24 hours.

As Knock does: the replay carries `idempotent-replayed: true` and `original-x-request-id`; only
successful answers are kept (a failed request can be retried with the same key); a key reused with
other parameters is refused (422); a key whose first request is still running answers 409.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from audiences.api.errors import ApiError
from audiences.membership import store as tables
from audiences.membership.store import MembershipStore, now_text

WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class Replay:
    status_code: int
    body: object
    request_id: str


def begin(store: MembershipStore, key_id: str, key: str, request_hash: str, request_id: str) -> Replay | None:
    """Claim the key for this request, or return the first answer to replay."""
    requests = tables.idempotent_requests
    cutoff = (datetime.now(timezone.utc) - WINDOW).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    where = (requests.c.key_id == key_id, requests.c.idempotency_key == key)
    with store.engine.begin() as connection:
        connection.execute(requests.delete().where(*where, requests.c.created_at < cutoff))
        row = connection.execute(sa.select(requests).where(*where)).first()
        if row is None:
            store.insert_ignoring_duplicates(connection, requests, [{
                "key_id": key_id, "idempotency_key": key, "request_hash": request_hash, "status_code": None,
                "body": None, "request_id": request_id, "created_at": now_text()}])
            return None
    if row.request_hash != request_hash:
        raise ApiError(422, "idempotency_key_reused",
                       "this Idempotency-Key was used with different parameters in the last 24 hours",
                       field="Idempotency-Key")
    if row.status_code is None:
        raise ApiError(409, "idempotent_request_in_progress",
                       "a request with this Idempotency-Key is still being processed; retry shortly")
    return Replay(row.status_code, json.loads(row.body) if row.body else None, row.request_id)


def finish(store: MembershipStore, key_id: str, key: str, status_code: int, body: object) -> None:
    if not 200 <= status_code < 300:
        return forget(store, key_id, key)
    requests = tables.idempotent_requests
    with store.engine.begin() as connection:
        connection.execute(requests.update()
                           .where(requests.c.key_id == key_id, requests.c.idempotency_key == key)
                           .values(status_code=status_code, body=None if body is None else json.dumps(body)))


def forget(store: MembershipStore, key_id: str, key: str) -> None:
    requests = tables.idempotent_requests
    with store.engine.begin() as connection:
        connection.execute(requests.delete().where(requests.c.key_id == key_id, requests.c.idempotency_key == key))
