"""Creating the store's tables is safe when several processes start at once on a new store (two
delivery workers, the API and a pipeline run): each one either creates a table or finds it made."""

from __future__ import annotations

import multiprocessing

import pytest
import sqlalchemy as sa

from audiences.store.database import MembershipStore, metadata

CREATORS = 4


@pytest.fixture(params=["sqlite", "postgresql"])
def new_store_url(request, tmp_path):
    """The URL of a store no one has created yet: a SQLite file, and a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.sqlite"
    return request.getfixturevalue("postgres_server").fresh_database()


def _create(url: str, start, results) -> None:
    store = MembershipStore(url)
    start.wait()
    try:
        store.create()
        results.put(None)
    except Exception as error:  # sent back whole, for the assertion's message
        results.put(f"{type(error).__name__}: {error}")
    finally:
        store.dispose()


def test_processes_creating_a_new_store_at_once_all_succeed(new_store_url):
    context = multiprocessing.get_context("fork")
    for attempt in range(2):
        if attempt:  # the same store made new again
            dropping = MembershipStore(new_store_url)
            metadata.drop_all(dropping.engine)
            dropping.dispose()
        start, results = context.Barrier(CREATORS), context.Queue()
        creators = [
            context.Process(target=_create, args=(new_store_url, start, results))
            for _ in range(CREATORS)
        ]
        for creator in creators:
            creator.start()
        failures = [results.get(timeout=120) for _ in creators]
        for creator in creators:
            creator.join(timeout=30)
        assert [failure for failure in failures if failure] == []
        assert {creator.exitcode for creator in creators} == {0}

    store = MembershipStore(new_store_url)
    present = set(sa.inspect(store.engine).get_table_names())
    store.dispose()
    assert {table.name for table in metadata.sorted_tables} <= present
