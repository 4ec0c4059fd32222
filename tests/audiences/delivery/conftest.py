"""Delivery tests' shared fixtures: a real PostgreSQL server, when one can be had."""

from __future__ import annotations

import pytest
from postgres_server import start_postgres


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for the session (see `postgres_server.py`); skips when there is none."""
    server = start_postgres()
    yield server
    server.stop()
