"""Delivery tests' shared fixtures: a real PostgreSQL server, when one can be had, and a fresh
store on SQLite and on PostgreSQL for each test."""

from __future__ import annotations

import pytest
from postgres_server import start_postgres

from audiences.store.database import MembershipStore


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for the session (see `postgres_server.py`); skips when there is none."""
    server = start_postgres()
    yield server
    server.stop()


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
