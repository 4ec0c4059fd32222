"""Writers to a SQLite store take turns: a writer is never starved by others that commit back to
back (API clients hammering static members while a pipeline run publishes)."""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa

from audiences.store import database

HOLD = 0.02  # each hog holds the write lock this long per transaction
HOGS = 3


def test_threads_of_one_process_take_turns_too(tmp_path, monkeypatch):
    monkeypatch.setattr(database, "SQLITE_WRITE_WAIT_SECONDS", 8)
    store = database.MembershipStore(f"sqlite:///{tmp_path}/store.sqlite")
    with store.engine.begin() as connection:
        connection.execute(sa.text("create table counter (n integer)"))
        connection.execute(sa.text("insert into counter values (0)"))
    stop = time.monotonic() + 6
    errors: list[BaseException] = []

    def hog() -> None:
        try:
            while time.monotonic() < stop:
                with store.engine.begin() as connection:
                    connection.execute(sa.text("update counter set n = n + 1"))
                    time.sleep(HOLD)
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=hog) for _ in range(HOGS)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    started = time.monotonic()
    other = database.MembershipStore(store.url)  # another pool, as the pipeline's own store
    with other.engine.begin() as connection:
        connection.execute(sa.text("update counter set n = n + 1000000"))
    waited = time.monotonic() - started
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert waited < 3, waited


def test_a_failed_transaction_gives_its_turn_back(tmp_path, monkeypatch):
    monkeypatch.setattr(database, "SQLITE_WRITE_WAIT_SECONDS", 2)
    store = database.MembershipStore(f"sqlite:///{tmp_path}/store.sqlite")
    with store.engine.begin() as connection:
        connection.execute(sa.text("create table t (n integer)"))
    # A transaction that fails inside gives its turn back: the next writer is not blocked.
    try:
        with store.engine.begin() as connection:
            connection.execute(sa.text("insert into missing values (1)"))
    except sa.exc.OperationalError:
        pass
    started = time.monotonic()
    with database.MembershipStore(store.url).engine.begin() as connection:
        connection.execute(sa.text("insert into t values (1)"))
    assert time.monotonic() - started < 1
