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


def test_the_applier_hands_every_entry_it_applies_to_real_time_with_what_it_set(tmp_path):
    """A pass applies every entry waiting in the journal, also those the applier has not been
    told of yet (their news on its way, as under load): each of their users goes to real time
    at once, with the properties it set (only the audiences reading them), and the news that
    comes later hands nothing again; an entry applied by another writer of profiles goes to real
    time for every audience."""
    from audiences.api.writer import JournalApplier
    from audiences.store.database import now_text
    from audiences.store.journal import journal_of
    from audiences.store.profiles import apply_journal, dump_patch, identify

    store = MembershipStore(f"sqlite:///{tmp_path}/store.sqlite").create()
    with store.engine.begin() as connection:  # known users: an identify changes what it sets
        identify(store, connection, [("ada", {"plan": "free"}), ("bea", {"plan": "free"})])
    journal = journal_of(store, create=True)
    handed: list[tuple[list[str], frozenset[str] | None]] = []

    class Environment:
        name = "development"

        def __init__(self):
            self.store, self.journal = store, journal
            self.writer = GroupCommitWriter(store.engine)

        def write(self, work):
            return self.writer.write(work)

        def identified(self, user_ids, changed=None):
            handed.append((list(user_ids), None if changed is None else frozenset(changed)))

    def journaled(user_id: str, patch: dict) -> int:
        with journal.engine.begin() as connection:
            return journal.append(connection, [(user_id, dump_patch(patch), now_text())])[0]

    environment = Environment()
    applier = JournalApplier(environment)
    try:
        first, second = journaled("ada", {"plan": "pro"}), journaled("bea", {"seats": 3})
        third = journaled("cy", {"plan": "pro"})  # a new user: every audience
        applier.journaled(first, "ada", ["plan"])  # the others' news is still on its way
        assert applier.wait_idle(10)
        assert handed == [
            (["ada"], frozenset({"plan"})),
            (["bea"], frozenset({"seats"})),
            (["cy"], None),
        ]
        applier.journaled(second, "bea", ["seats"])
        applier.journaled(third, "cy", ["plan"])
        assert applier.wait_idle(10)
        assert len(handed) == 3  # already handed: nothing twice

        fourth = journaled("ada", {"seats": 1})
        apply_journal(store)  # another writer of profiles applies it first
        applier.journaled(fourth, "ada", ["seats"])
        assert applier.wait_idle(10)
        assert handed[3:] == [(["ada"], None)]
    finally:
        applier.close()
        environment.writer.close()
        journal.dispose()
        store.dispose()
