"""Group commit: writes waiting together share one commit, and a failing write fails alone."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from audiences.api.writer import GroupCommitWriter
from audiences.store.database import MembershipStore


def test_a_failing_write_in_a_group_fails_alone_and_the_others_are_committed(tmp_path):
    store = MembershipStore(f"sqlite:///{tmp_path}/store.sqlite").create()
    writer = GroupCommitWriter(store.engine)
    started, release = threading.Event(), threading.Event()
    results: dict[int, object] = {}

    def blocker(connection):  # holds the writer so that the next writes queue up as one group
        started.set()
        release.wait(10)
        return "first"

    def insert(number: int):
        def work(connection):
            connection.exec_driver_sql(
                "insert into store_markers (name, value) values (?, ?)", (f"m{number}", "x")
            )
            if number == 3:
                raise ValueError("write 3 fails")
            return number

        return work

    def submit(number: int, work) -> None:
        try:
            results[number] = writer.write(work)
        except ValueError as error:
            results[number] = error

    threads = [threading.Thread(target=submit, args=(0, blocker))]
    threads += [
        threading.Thread(target=submit, args=(number, insert(number))) for number in range(1, 6)
    ]
    threads[0].start()
    assert started.wait(10)
    for thread in threads[1:]:
        thread.start()
    deadline = time.monotonic() + 10
    while writer._jobs.qsize() < 5 and time.monotonic() < deadline:  # all five wait: one group
        time.sleep(0.01)
    assert writer._jobs.qsize() == 5
    release.set()
    for thread in threads:
        thread.join(10)
    writer.close()
    assert results[0] == "first" and [results[n] for n in (1, 2, 4, 5)] == [1, 2, 4, 5]
    assert isinstance(results[3], ValueError)
    names = {row["name"] for row in store.rows(sa.text("select name from store_markers"))}
    assert names == {"m1", "m2", "m4", "m5"}
    store.dispose()


def test_writes_are_visible_only_after_they_return(tmp_path):
    store = MembershipStore(f"sqlite:///{tmp_path}/store.sqlite").create()
    writer = GroupCommitWriter(store.engine)
    writer.write(
        lambda connection: connection.exec_driver_sql(
            "insert into store_markers (name, value) values ('a', '1')"
        )
    )
    assert store.rows(sa.text("select value from store_markers where name = 'a'")) == [
        {"value": "1"}
    ]
    with pytest.raises(RuntimeError):
        writer.write(lambda connection: (_ for _ in ()).throw(RuntimeError("no")))
    writer.close()
    store.dispose()
