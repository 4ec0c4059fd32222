"""Secret keys of the HTTP API, one set per environment, stored hashed in that environment's store.

A key looks like `sk_<environment>_<random>`; it is shown once, when created. The store keeps only
its SHA-256, so a copy of the store gives no working key. Revoking a key takes effect on the next
request.

A key works only in its own environment. The server looks a key up only in the store of the
environment its prefix names, and accepts it only if the key was made for that environment. A
store records the environment it belongs to the first time `audiences keys` or `audiences serve`
opens it (`bind_store`), so that a store given to one environment by one process and to another
by another (different `AUDIENCES_ENV` or store URLs) is refused instead of mixing their data.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from audiences.store import database as tables
from audiences.store.database import MembershipStore, now_text


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
        connection.execute(
            tables.api_keys.insert().values(
                key_id=key.key_id,
                key_hash=key_hash(secret),
                name=name,
                environment=environment,
                created_at=now_text(),
                revoked_at=None,
            )
        )
    return key, secret


def revoke_key(store: MembershipStore, key_id: str) -> bool:
    keys = tables.api_keys
    with store.engine.begin() as connection:
        return (
            connection.execute(
                keys.update()
                .where(keys.c.key_id == key_id, keys.c.revoked_at.is_(None))
                .values(revoked_at=now_text())
            ).rowcount
            == 1
        )


def list_keys(store: MembershipStore) -> list[dict]:
    keys = tables.api_keys
    return store.rows(
        sa.select(
            keys.c.key_id, keys.c.name, keys.c.environment, keys.c.created_at, keys.c.revoked_at
        ).order_by(keys.c.created_at)
    )


def find_key(store: MembershipStore, secret: str, environment: str) -> ApiKey | None:
    """The live key with this secret in this environment's store, if it was made for this
    environment."""
    mark = store.placeholder
    # Every request runs this: plain SQL on the unique hash index, no statement building.
    with store.read_engine.connect() as connection:
        row = connection.exec_driver_sql(
            f"select key_id, environment, name from api_keys where key_hash = {mark} and revoked_at is null "
            f"and environment = {mark}",
            (key_hash(secret), environment),
        ).first()
    return ApiKey(*row) if row else None


def key_environments(secret: str, environments: Iterable[str]) -> list[str]:
    """The environments whose prefix (`sk_<environment>_`) the secret carries."""
    return [name for name in environments if secret.startswith(f"sk_{name}_")]


ENVIRONMENT_MARKER = "environment"


class StoreEnvironmentError(ValueError):
    """A store that belongs to another environment than the one it was given to."""


def bind_store(store: MembershipStore, environment: str) -> None:
    """Check that the store is this environment's, and record it the first time.

    A store without a record that already holds keys of other environments only (made before
    stores recorded their environment) belongs to those: it is refused as well."""
    markers, keys = tables.store_markers, tables.api_keys
    with store.engine.begin() as connection:
        owner = connection.execute(
            sa.select(markers.c.value).where(markers.c.name == ENVIRONMENT_MARKER)
        ).scalar()
        if owner is None:
            held = sorted(
                set(connection.execute(sa.select(keys.c.environment).distinct()).scalars())
                - {"*"}  # service tokens (api/management.py) serve every environment
            )
            if held and environment not in held:
                owner = ", ".join(held)
            else:
                store.insert_ignoring_duplicates(
                    connection, markers, [{"name": ENVIRONMENT_MARKER, "value": environment}]
                )
                owner = connection.execute(
                    sa.select(markers.c.value).where(markers.c.name == ENVIRONMENT_MARKER)
                ).scalar()
    if owner != environment:
        raise _belongs_elsewhere(store.url, owner, environment)


def refuse_other_environment(url: str, environment: str) -> None:
    """`bind_store`'s refusal without its writes: raise when the store at `url` exists and records
    another environment; a store not made yet, or with no record, is left as it is."""
    database = sa.engine.make_url(url).database
    if url.startswith("sqlite") and (not database or not Path(database).expanduser().exists()):
        return
    store = MembershipStore(url)
    try:
        markers = tables.store_markers
        if not sa.inspect(store.read_engine).has_table(markers.name):
            return
        with store.read_engine.connect() as connection:
            owner = connection.execute(
                sa.select(markers.c.value).where(markers.c.name == ENVIRONMENT_MARKER)
            ).scalar()
    finally:
        store.dispose()
    if owner is not None and owner != environment:
        raise _belongs_elsewhere(url, owner, environment)


def _belongs_elsewhere(url: str, owner: str, environment: str) -> StoreEnvironmentError:
    return StoreEnvironmentError(
        f"the store {safe_url(url)} belongs to the {owner} environment, not {environment}; "
        f"check AUDIENCES_ENV, AUDIENCES_STORE_URL and AUDIENCES_STORE_URL_{environment.upper()}"
    )


def safe_url(url: str) -> str:
    """A store URL without its password, to name it in messages."""
    return sa.engine.make_url(url).render_as_string(hide_password=True)
