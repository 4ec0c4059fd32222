"""Delivery tests' shared fixtures: a fresh store on SQLite and on PostgreSQL (the session's
`postgres_server`, when one can be had) for each test."""

from __future__ import annotations

import pytest

from audiences.store.database import MembershipStore


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh store's URL: a SQLite file, and a PostgreSQL database (see `postgres_server.py`)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.sqlite"
    return request.getfixturevalue("postgres_server").fresh_database()


@pytest.fixture
def store(store_url):
    """The store at `store_url`, its tables created."""
    opened = MembershipStore(store_url).create()
    yield opened
    opened.dispose()
