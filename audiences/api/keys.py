"""Secret keys of the HTTP API, one set per environment, stored hashed in that environment's store.

A key looks like `sk_<environment>_<random>`; it is shown once, when created. The store keeps only
its SHA-256, so a copy of the store gives no working key. Revoking a key takes effect on the next
request.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import sqlalchemy as sa

from audiences.membership import store as tables
from audiences.membership.store import MembershipStore, now_text


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    environment: str
    name: str


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def create_key(store: MembershipStore, environment: str, name: str) -> tuple[ApiKey, str]:
    """Create a key; returns it and its secret (the only time the secret is seen)."""
    secret = f"sk_{environment}_{secrets.token_urlsafe(32)}"
    key = ApiKey(secrets.token_hex(8), environment, name)
    with store.engine.begin() as connection:
        connection.execute(tables.api_keys.insert().values(
            key_id=key.key_id, key_hash=key_hash(secret), name=name, environment=environment,
            created_at=now_text(), revoked_at=None))
    return key, secret


def revoke_key(store: MembershipStore, key_id: str) -> bool:
    keys = tables.api_keys
    with store.engine.begin() as connection:
        return connection.execute(keys.update().where(keys.c.key_id == key_id, keys.c.revoked_at.is_(None))
                                  .values(revoked_at=now_text())).rowcount == 1


def list_keys(store: MembershipStore) -> list[dict]:
    keys = tables.api_keys
    return store.rows(sa.select(keys.c.key_id, keys.c.name, keys.c.environment, keys.c.created_at,
                                keys.c.revoked_at).order_by(keys.c.created_at))


def find_key(store: MembershipStore, secret: str) -> ApiKey | None:
    """The live key with this secret in this store, if any."""
    mark = store.placeholder
    # Every request runs this: plain SQL on the unique hash index, no statement building.
    with store.read_engine.connect() as connection:
        row = connection.exec_driver_sql(
            f"select key_id, environment, name from api_keys where key_hash = {mark} and revoked_at is null",
            (key_hash(secret),)).first()
    return ApiKey(*row) if row else None
