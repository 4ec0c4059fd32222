"""The store's record of definition commits (`definition_commits`), read by the lifecycle.

Each environment's store holds the commits of audience definitions that reached it, in the order
they were made (`audiences/lifecycle/commits.py` writes them). It lives in the store stage so that
delivery can tell an archived audience's triggers from a typo without importing the lifecycle.
"""

from __future__ import annotations

import sqlalchemy as sa

from audiences.store import database as tables
from audiences.store.database import MembershipStore

definition_commits = sa.Table(
    "definition_commits",
    tables.metadata,
    sa.Column("commit_id", sa.String(36), primary_key=True),
    # The order commits were made in, the same in every store they reach.
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("audience_key", sa.String(255), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),  # commit | archive
    sa.Column("definition", sa.Text),  # the audience.json document; null for an archive
    # The definition's version (`AudienceDefinition.version`), which membership intervals and
    # events record, and the full SHA-256 of its canonical JSON.
    sa.Column("version", sa.String(64)),
    sa.Column("content_hash", sa.String(64)),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("author", sa.String(255), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("environment", sa.String(64), nullable=False),  # where it was made
    sa.Column("promoted_at", sa.String(32)),  # when it reached this store by promotion
    sa.Index("definition_commits_position", "position", unique=True),
    sa.Index("definition_commits_by_audience", "audience_key", "position"),
)


def archived_in(url: str) -> set[str]:
    """The audiences whose latest commit in the store at `url` is an archive."""
    store = MembershipStore(url).create()
    try:
        with store.read_engine.connect() as connection:
            rows = connection.execute(
                sa.select(definition_commits.c.audience_key, definition_commits.c.action).order_by(
                    definition_commits.c.position
                )
            ).all()
    finally:
        store.dispose()
    latest = dict(rows)
    return {key for key, action in latest.items() if action == "archive"}
