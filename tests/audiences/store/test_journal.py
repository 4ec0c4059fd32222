"""The identify journal (`store/journal.py`): identifies committed in a file of their own reach
the store once and in order, as the same identifies made in the store would, and a reader sees
them before they do."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from audiences.store import database as tables
from audiences.store.database import MembershipStore, now_text
from audiences.store.journal import journal_of
from audiences.store.profiles import (
    apply_journal,
    delete_user,
    dump_patch,
    get_profile,
    identify,
    lock_profiles,
)

values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=2),
    lambda children: st.dictionaries(st.sampled_from("ab"), children, max_size=2),
    max_leaves=5,
)
patches = st.dictionaries(st.sampled_from("abc"), values, max_size=3)


def journaled(store: MembershipStore, entries: list[tuple[str, dict]]) -> None:
    journal = journal_of(store, create=True)
    with journal.engine.begin() as connection:
        journal.append(
            connection, [(user_id, dump_patch(patch), now_text()) for user_id, patch in entries]
        )


def state(store: MembershipStore) -> tuple[dict, list]:
    profiles = {user_id: get_profile(store, user_id) for user_id in "uvw"}
    queued = [
        (row["user_id"], json.loads(row["patch"]))
        for row in store.rows(
            sa.select(tables.user_patches.c.user_id, tables.user_patches.c.patch).order_by(
                tables.user_patches.c.patch_id
            )
        )
    ]
    return {u: p and p.properties for u, p in profiles.items()}, queued


@given(
    before=st.lists(st.tuples(st.sampled_from("uv"), patches), max_size=2),
    calls=st.lists(st.tuples(st.sampled_from("uvw"), patches), min_size=1, max_size=6),
    deleted=st.sampled_from([None, "u"]),
)
@settings(max_examples=12, deadline=None)
def test_journaled_identifies_reach_the_store_as_identifies_made_in_it(
    tmp_path_factory, before, calls, deleted
):
    results = []
    for way in ("in the store", "journaled"):
        store = MembershipStore(f"sqlite:///{tmp_path_factory.mktemp('s')}/store.sqlite").create()
        with store.engine.begin() as connection:
            identify(store, connection, before)
            if deleted:
                delete_user(store, connection, deleted)
        if way == "journaled":
            journaled(store, calls)
            seen = state(store)[0]  # before the store has them: the reader applies them
            assert apply_journal(store) == sorted({user_id for user_id, _ in calls})
            assert apply_journal(store) == []  # once
            assert state(store)[0] == seen
            assert journal_of(store).entries_after(0) == []  # applied, then deleted
        else:
            for call in calls:  # one call each, as the API makes them
                with store.engine.begin() as connection:
                    identify(store, connection, [call])
        results.append(state(store))
        store.dispose()
    assert results[0] == results[1]


@pytest.fixture
def sqlite_store(store):
    if not store.url.startswith("sqlite"):
        pytest.skip("the identify journal serves SQLite stores")
    return store


def test_a_writer_of_profiles_applies_the_journal_first(sqlite_store):
    """A delete after a journaled identify comes after it, in the profiles and in the queue."""
    store = sqlite_store
    journaled(store, [("ada", {"plan": "pro"})])
    with store.engine.begin() as connection:
        lock_profiles(store, connection)
        assert delete_user(store, connection, "ada")
    assert get_profile(store, "ada") is None
    assert state(store)[1] == [("ada", {"plan": "pro"}), ("ada", None)]
    journaled(store, [("ada", {"plan": "free"})])  # identified again: back, with only this
    assert get_profile(store, "ada").properties == {"plan": "free"}


def test_a_journal_made_again_counts_from_nothing_applied(sqlite_store):
    """The store's marker names its journal: a journal file made anew (numbering from 1 again)
    has its entries applied, not skipped as if the old marker covered them."""
    store = sqlite_store
    journaled(store, [("ada", {"n": 1}), ("bea", {"n": 1})])
    apply_journal(store)
    journal = journal_of(store)
    journal.dispose()
    for suffix in ("", "-wal", "-shm"):
        journal.path.with_name(journal.path.name + suffix).unlink(missing_ok=True)
    from audiences.store import journal as module

    module._journals.clear()
    journaled(store, [("cy", {"n": 1})])
    assert apply_journal(store) == ["cy"]
    assert get_profile(store, "cy").properties == {"n": 1}
