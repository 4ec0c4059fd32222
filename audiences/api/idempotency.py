"""`Idempotency-Key` on writes: the first 2xx answer to a key is replayed for 24 hours.

As Knock does: the replay carries `idempotent-replayed: true` and `original-x-request-id`; only
successful answers are kept (a failed request can be retried with the same key); a key reused with
other parameters is refused (422).

The key is claimed and its answer recorded in the same transaction as the work itself (Stripe's
design), so the two commit together or not at all. A server killed in the middle of a request
leaves no claim behind: a retry with the same key does the work, which had not been done. A retry
of a request whose work was committed gets the recorded answer. Two requests with the same key at
once take turns through the store's write lock (SQLite's one writer; on PostgreSQL the second
waits on the first's uncommitted claim row): one does the work, and the other then finds its
answer and replays it. So the work is done exactly once, and no key is ever left "in progress".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from audiences.api.errors import ApiError
from audiences.store import database as tables
from audiences.store.database import MembershipStore, now_text

WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class Replay:
    status_code: int
    body: object
    request_id: str


class Replayed(Exception):
    """Raised inside a write's transaction when its key was answered already (the transaction is
    rolled back, having done nothing); the request answers with the replay."""

    def __init__(self, replay: Replay):
        super().__init__("replayed")
        self.replay = replay


@dataclass(frozen=True)
class Claim:
    """A write sent with an `Idempotency-Key`, and the status it answers with when it succeeds."""

    key_id: str
    key: str
    request_hash: str
    request_id: str
    status_code: int

    def where(self) -> tuple:
        requests = tables.idempotent_requests
        return requests.c.key_id == self.key_id, requests.c.idempotency_key == self.key


def _cutoff() -> str:
    return (datetime.now(UTC) - WINDOW).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _replay_of(row, claim: Claim) -> Replay:
    if row.request_hash != claim.request_hash:
        raise ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used with different parameters in the last 24 hours",
            field="Idempotency-Key",
        )
    return Replay(row.status_code, json.loads(row.body) if row.body else None, row.request_id)


def find(store: MembershipStore, claim: Claim) -> Replay | None:
    """The recorded answer to this key, read before the write takes its turn (most retries stop
    here); the write's transaction checks again (`run_once`)."""
    requests = tables.idempotent_requests
    with store.read_engine.connect() as connection:
        row = connection.execute(
            sa.select(requests).where(
                *claim.where(),
                requests.c.created_at >= _cutoff(),
                requests.c.status_code.is_not(None),
            )
        ).first()
    return _replay_of(row, claim) if row is not None else None


def run_once(
    store: MembershipStore, claim: Claim, work: Callable[[Any], Any]
) -> Callable[[Any], Any]:
    """`work(connection)` wrapped to claim the key first and record the answer after, in the same
    transaction: the answer's body is the work's result (none for a 204)."""

    def claimed_work(connection):
        _claim(store, connection, claim)
        result = work(connection)
        body = None if claim.status_code == 204 or result is None else json.dumps(result)
        connection.execute(
            tables.idempotent_requests.update()
            .where(*claim.where())
            .values(status_code=claim.status_code, body=body)
        )
        return result

    return claimed_work


def _claim(store: MembershipStore, connection, claim: Claim) -> None:
    """Claim the key inside the write's transaction, or raise `Replayed` with its recorded answer."""
    requests = tables.idempotent_requests
    connection.execute(requests.delete().where(*claim.where(), requests.c.created_at < _cutoff()))
    row = {
        "key_id": claim.key_id,
        "idempotency_key": claim.key,
        "request_hash": claim.request_hash,
        "status_code": None,
        "body": None,
        "request_id": claim.request_id,
        "created_at": now_text(),
    }
    if store.insert_ignoring_duplicates(connection, requests, [row]):
        return
    existing = connection.execute(sa.select(requests).where(*claim.where())).first()
    if existing.status_code is None:
        # A claim committed without its answer by an older version of the engine, which claimed
        # keys before doing the work: a server killed in between left it. The work was not
        # recorded as done, so this request does it.
        connection.execute(
            requests.update()
            .where(*claim.where())
            .values(
                {
                    name: value
                    for name, value in row.items()
                    if name not in ("key_id", "idempotency_key")
                }
            )
        )
        return
    raise Replayed(_replay_of(existing, claim))
