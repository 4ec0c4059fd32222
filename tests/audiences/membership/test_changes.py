"""Membership diffs: events with deterministic ids, validity intervals, backfill, circuit breaker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from condition_harness import evaluation_warehouse, set_evaluation

from audiences.membership.changes import CircuitBreaker, members_at, record_changes

T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
def warehouse():
    connection = evaluation_warehouse([{"id": f"u{i}"} for i in range(1, 11)])
    yield connection
    connection.close()


def evaluate(
    connection,
    moment,
    members: dict[str, list],
    versions: dict[str, str] | None = None,
    breaker=CircuitBreaker(0.2, 1000),
):
    """Stand in for one dbt evaluation (the catalog and members tables), then the diff."""
    set_evaluation(connection, members, versions)
    return record_changes(connection, moment, breaker)


def outbox(connection) -> list[tuple]:
    return connection.execute(
        "select audience_key, user_id, tenant, event_type, entry_number, is_backfill, batch_id is not null "
        "from raw.membership_outbox order by sequence"
    ).fetchall()


def test_first_evaluation_records_entries_as_backfill(warehouse):
    summary = evaluate(warehouse, T0, {"pro": [1, 2]})
    assert (summary.entered, summary.exited, summary.audiences[0].is_backfill) == (2, 0, True)
    assert outbox(warehouse) == [
        ("pro", "u1", None, "entered", 1, True, False),
        ("pro", "u2", None, "entered", 1, True, False),
    ]


def test_enter_exit_and_reenter_get_distinct_deterministic_ids(warehouse):
    evaluate(warehouse, T0, {"pro": [1]})
    evaluate(warehouse, T0 + timedelta(hours=1), {"pro": [1, 2]})
    evaluate(warehouse, T0 + timedelta(hours=2), {"pro": [1]})
    evaluate(warehouse, T0 + timedelta(hours=3), {"pro": [1, 2]})
    events = outbox(warehouse)
    assert events[1:] == [
        ("pro", "u2", None, "entered", 1, False, False),
        ("pro", "u2", None, "exited", 1, False, False),
        ("pro", "u2", None, "entered", 2, False, False),
    ]
    ids = [
        row[0] for row in warehouse.execute("select event_id from raw.membership_outbox").fetchall()
    ]
    assert len(set(ids)) == len(ids)


def test_the_same_change_always_gets_the_same_event_id(warehouse):
    evaluate(warehouse, T0, {"pro": []})
    evaluate(warehouse, T0 + timedelta(hours=1), {"pro": [3]})
    first = warehouse.execute("select event_id from raw.membership_outbox").fetchone()[0]
    other = evaluation_warehouse([{"id": f"u{i}"} for i in range(1, 11)])
    evaluate(other, T0, {"pro": []})
    evaluate(other, T0 + timedelta(hours=5), {"pro": [3]})  # a re-run at another time
    assert other.execute("select event_id from raw.membership_outbox").fetchone()[0] == first


def test_the_warehouses_event_ids_are_the_ones_python_computes_for_static_changes(warehouse):
    """The diff's SQL and `store.members.event_id` mint the id of the same change alike: entered
    and exited, a second entry, with a tenant and without (no tenant hashes as '')."""
    from audiences.store.members import event_id

    evaluate(warehouse, T0, {"pro": []})
    evaluate(warehouse, T0 + timedelta(hours=1), {"pro": [1, (2, "acme")]})
    evaluate(warehouse, T0 + timedelta(hours=2), {"pro": []})
    evaluate(warehouse, T0 + timedelta(hours=3), {"pro": [1]})
    rows = warehouse.execute(
        "select event_id, audience_key, user_id, tenant, event_type, entry_number "
        "from raw.membership_outbox order by sequence"
    ).fetchall()
    assert len(rows) == 5
    assert {row[3] for row in rows} == {None, "acme"}
    assert [row[0] for row in rows] == [event_id(*row[1:]) for row in rows]


def test_rerunning_an_evaluation_mints_nothing(warehouse):
    evaluate(warehouse, T0, {"pro": [1, 2]})
    again = evaluate(warehouse, T0, {"pro": [1, 2]})
    assert (again.entered, again.exited) == (0, 0)
    assert len(outbox(warehouse)) == 2


def test_deleted_user_exits_and_history_answers_who_was_in_when(warehouse):
    evaluate(warehouse, T0, {"pro": [1, 2]})
    evaluate(warehouse, T0 + timedelta(days=1), {"pro": [1]})  # u2 deleted: gone from the members
    assert outbox(warehouse)[-1] == ("pro", "u2", None, "exited", 1, False, False)
    assert members_at(warehouse, "pro", T0 + timedelta(hours=12)) == [
        {"user_id": "u1", "tenant": None},
        {"user_id": "u2", "tenant": None},
    ]
    assert members_at(warehouse, "pro", T0 + timedelta(days=1)) == [
        {"user_id": "u1", "tenant": None}
    ]
    assert members_at(warehouse, "pro", T0 - timedelta(seconds=1)) == []


def test_definition_change_records_the_new_version(warehouse):
    evaluate(warehouse, T0, {"pro": [1, 2]}, {"pro": "v1"})
    evaluate(warehouse, T0 + timedelta(hours=1), {"pro": [2, 3]}, {"pro": "v2"})
    rows = warehouse.execute(
        "select user_id, event_type, audience_version from raw.membership_outbox where not is_backfill "
        "order by user_id"
    ).fetchall()
    assert rows == [("u1", "exited", "v2"), ("u3", "entered", "v2")]


def test_tenants_are_distinct_memberships(warehouse):
    evaluate(warehouse, T0, {"vip": [(1, "acme")]})
    evaluate(warehouse, T0 + timedelta(hours=1), {"vip": [(1, "acme"), (1, "globex"), (1, None)]})
    rows = [row[:4] for row in outbox(warehouse)[1:]]
    assert sorted(rows, key=str) == sorted(
        [("vip", "u1", "globex", "entered"), ("vip", "u1", None, "entered")], key=str
    )


def test_a_new_audience_is_backfill_while_others_trigger(warehouse):
    evaluate(warehouse, T0, {"pro": [1]})
    summary = evaluate(warehouse, T0 + timedelta(hours=1), {"pro": [1, 2], "new": [3]})
    by_key = {change.audience_key: change for change in summary.audiences}
    assert (by_key["new"].is_backfill, by_key["pro"].is_backfill) == (True, False)


def test_circuit_breaker_holds_a_mass_exit(warehouse):
    breaker = CircuitBreaker(share=0.2, minimum=3)
    evaluate(warehouse, T0, {"pro": list(range(1, 11))}, breaker=breaker)
    summary = evaluate(
        warehouse, T0 + timedelta(hours=1), {"pro": [1, 2]}, breaker=breaker
    )  # 8 of 10 leave
    [held] = summary.held
    assert (held.exited, held.size_before) == (8, 10)
    assert all(row[6] for row in outbox(warehouse)[10:])
    small = evaluate(warehouse, T0 + timedelta(hours=2), {"pro": [1, 2, 3]}, breaker=breaker)
    assert small.held == []  # one user is below the minimum


def test_history_only_moves_forward(warehouse):
    evaluate(warehouse, T0, {"pro": [1]})
    with pytest.raises(ValueError, match="only moves forward"):
        evaluate(warehouse, T0 - timedelta(days=1), {"pro": []})


def test_only_rows_the_builds_logged_as_reevaluated_are_compared(warehouse):
    """dbt logs what each build of audience_members re-evaluated; the diff compares just that, then
    empties the log. (Builds that re-evaluate nothing for a user leave its rows as they were.)"""
    evaluate(warehouse, T0, {"pro": [1, 2], "eu": [3]})
    warehouse.execute(
        "create table main.audience_members__reevaluated (audience_key varchar, user_key integer)"
    )
    # Two builds before a diff: the first re-evaluated user 4, the second audience `eu` whole.
    warehouse.execute(
        "insert into main.audience_members__reevaluated values (null, 4), ('eu', null)"
    )
    # User 5's row changed without being logged: a build never does that, and the diff trusts the log.
    summary = evaluate(warehouse, T0 + timedelta(hours=1), {"pro": [1, 2, 4, 5], "eu": [6]})
    assert set(outbox(warehouse)[3:]) == {
        ("eu", "u3", None, "exited", 1, False, False),
        ("eu", "u6", None, "entered", 1, False, False),
        ("pro", "u4", None, "entered", 1, False, False),
    }
    assert (summary.entered, summary.exited) == (2, 1)
    assert (
        warehouse.execute("select count(*) from main.audience_members__reevaluated").fetchone()[0]
        == 0
    )
    # Nothing logged since: nothing compared. `(null, null)` means everything was re-evaluated.
    assert (
        evaluate(warehouse, T0 + timedelta(hours=2), {"pro": [1, 2, 4, 5], "eu": [6]}).entered == 0
    )
    warehouse.execute("insert into main.audience_members__reevaluated values (null, null)")
    summary = evaluate(warehouse, T0 + timedelta(hours=3), {"pro": [1, 2, 4, 5], "eu": [6]})
    assert (summary.entered, summary.exited) == (1, 0)
    assert outbox(warehouse)[-1][:4] == ("pro", "u5", None, "entered")


def test_users_logged_in_one_audience_are_compared_in_that_audience_only(warehouse):
    """A per-tenant audience re-evaluated by pairs logs `(audience, user)` for the users of those
    pairs: the diff compares every tenant of theirs in that audience, and nothing else, once even
    when the user is also logged in every audience."""
    evaluate(warehouse, T0, {"admins": [(1, "acme"), (2, "acme")], "pro": [1, 2]})
    warehouse.execute(
        "create table main.audience_members__reevaluated (audience_key varchar, user_key integer)"
    )
    warehouse.execute(
        "insert into main.audience_members__reevaluated values "
        "('admins', 1), ('admins', 3), ('admins', 3), ('admins', 4), (null, 4)"
    )
    # Not logged: user 2's row in `admins`, user 1's in `pro` (the diff trusts the log).
    summary = evaluate(
        warehouse,
        T0 + timedelta(hours=1),
        {
            "admins": [(1, "globex"), (3, "acme"), (4, "acme"), (4, "globex")],
            "pro": [2, 4],
        },
    )
    assert set(outbox(warehouse)[4:]) == {
        ("admins", "u1", "acme", "exited", 1, False, False),
        ("admins", "u1", "globex", "entered", 1, False, False),
        ("admins", "u3", "acme", "entered", 1, False, False),
        ("admins", "u4", "acme", "entered", 1, False, False),
        ("admins", "u4", "globex", "entered", 1, False, False),
        ("pro", "u4", None, "entered", 1, False, False),
    }
    assert (summary.entered, summary.exited) == (5, 1)


def test_a_skipped_audience_keeps_its_open_memberships_and_gets_no_event(warehouse):
    """Its definition has errors, so the run did not evaluate it: whatever audience_members holds
    for it (here nothing), nobody left it."""
    evaluate(warehouse, T0, {"pro": [1, 2], "free": [3]})
    set_evaluation(warehouse, {"pro": [], "free": [3, 4]}, skipped=("pro",))
    summary = record_changes(warehouse, T0 + timedelta(hours=1))
    assert outbox(warehouse)[3:] == [("free", "u4", None, "entered", 1, False, False)]
    assert [change.audience_key for change in summary.audiences] == ["free"]
    assert members_at(warehouse, "pro", T0 + timedelta(hours=2)) == [
        {"user_id": "u1", "tenant": None},
        {"user_id": "u2", "tenant": None},
    ]
    # Fixed, it is evaluated again: now the change is real.
    evaluate(warehouse, T0 + timedelta(hours=2), {"pro": [1], "free": [3, 4]})
    assert outbox(warehouse)[4:] == [("pro", "u2", None, "exited", 1, False, False)]


def test_an_audience_nobody_entered_or_left_reports_its_members_as_its_size_before(warehouse):
    evaluate(warehouse, T0, {"pro": [1, 2, 3], "eu": [4, 5]})
    summary = evaluate(warehouse, T0 + timedelta(hours=1), {"pro": [1, 2, 3], "eu": [4, 5, 6]})
    sizes = {
        change.audience_key: (change.entered, change.exited, change.size_before)
        for change in summary.audiences
    }
    assert sizes == {"pro": (0, 0, 3), "eu": (1, 0, 2)}
    # With the evaluation's member counts beside the catalog (as dbt builds them), those are read.
    warehouse.execute(
        "create table main.audience_evaluations as select $t::timestamptz as evaluated_at, "
        "'pro' as audience_key, 3 as member_count",
        {"t": T0 + timedelta(hours=2)},
    )
    summary = evaluate(warehouse, T0 + timedelta(hours=2), {"pro": [1, 2, 3], "eu": [4, 5]})
    sizes = {
        change.audience_key: (change.entered, change.exited, change.size_before)
        for change in summary.audiences
    }
    assert sizes == {"pro": (0, 0, 3), "eu": (0, 1, 3)}


def test_pending_changes_counts_what_the_diff_will_record_and_records_nothing(warehouse):
    from audiences.membership.changes import pending_changes

    evaluate(warehouse, T0, {"pro": [1, 2, 3], "eu": [4]})
    set_evaluation(warehouse, {"pro": [1, 2, 7], "eu": [4]})
    outbox_before = outbox(warehouse)
    assert pending_changes(warehouse) == {"pro": (1, 1), "eu": (0, 0)}
    assert outbox(warehouse) == outbox_before
    summary = record_changes(warehouse, T0 + timedelta(hours=1))
    assert {
        change.audience_key: (change.entered, change.exited) for change in summary.audiences
    } == {"pro": (1, 1), "eu": (0, 0)}


def test_pending_changes_counts_only_the_rows_the_re_evaluation_log_puts_in_scope(warehouse):
    """pending_changes counts the diff `record_changes` records, scope included: a user the log
    re-evaluated in every audience, one pair, a whole audience; a change outside the log's scope
    (user 6 entering `pro`) is neither counted nor recorded."""
    from audiences.membership.changes import pending_changes

    evaluate(warehouse, T0, {"pro": [1, 2, 3], "eu": [4, (5, "acme")], "all": [1, 2]})
    warehouse.execute(
        "create table main.audience_members__reevaluated (audience_key varchar, user_key integer)"
    )
    warehouse.execute(
        "insert into main.audience_members__reevaluated values (null, 2), ('eu', 5), ('all', null)"
    )
    set_evaluation(warehouse, {"pro": [1, 3, 6], "eu": [4], "all": [1, 7, 8]})
    pending = pending_changes(warehouse)
    assert pending == {"pro": (0, 1), "eu": (0, 1), "all": (2, 1)}
    summary = record_changes(warehouse, T0 + timedelta(hours=1))
    assert {
        change.audience_key: (change.entered, change.exited) for change in summary.audiences
    } == pending


def test_an_archived_audiences_members_exit_once_and_only_once(warehouse):
    """Archived (its latest commit is an archive), the audience is no longer in the catalog: every
    open membership closes with an exit event, under the version its members entered with, and
    later runs (archived still) record nothing more. Even with a re-evaluation log naming no one."""
    evaluate(warehouse, T0, {"pro": [1, 2, (3, "acme")], "eu": [4]}, versions={"pro": "p1"})
    evaluate(warehouse, T0 + timedelta(hours=1), {"pro": [1, 2, (3, "acme")], "eu": [4]})
    warehouse.execute(
        "create table main.audience_members__reevaluated (audience_key varchar, user_key integer)"
    )
    warehouse.execute("insert into main.audience_members__reevaluated values (null, 4)")
    set_evaluation(warehouse, {"eu": [4]})
    summary = record_changes(warehouse, T0 + timedelta(hours=2), archived={"pro", "gone-long-ago"})
    assert sorted(outbox(warehouse)[4:], key=str) == [
        ("pro", "u1", None, "exited", 1, False, False),
        ("pro", "u2", None, "exited", 1, False, False),
        ("pro", "u3", "acme", "exited", 1, False, False),
    ]
    assert warehouse.execute(
        "select distinct audience_version from raw.membership_outbox where event_type = 'exited'"
    ).fetchall() == [("p1",)]
    pro = next(change for change in summary.audiences if change.audience_key == "pro")
    assert (pro.entered, pro.exited, pro.size_before, pro.is_backfill) == (0, 3, 3, False)
    assert members_at(warehouse, "pro", T0 + timedelta(hours=3)) == []
    assert members_at(warehouse, "pro", T0 + timedelta(hours=1))[0] == {
        "user_id": "u1",
        "tenant": None,
    }
    for hours in (3, 4):
        summary = record_changes(warehouse, T0 + timedelta(hours=hours), archived={"pro"})
        assert (summary.entered, summary.exited) == (0, 0)
    assert len(outbox(warehouse)) == 7


def test_an_archived_audience_that_empties_a_large_audience_is_held(warehouse):
    evaluate(warehouse, T0, {"pro": list(range(1, 11))})
    set_evaluation(warehouse, {})
    summary = record_changes(
        warehouse, T0 + timedelta(hours=1), CircuitBreaker(0.2, 5), archived={"pro"}
    )
    assert [change.held_batch is not None for change in summary.audiences] == [True]
    assert {row[6] for row in outbox(warehouse)[10:]} == {True}


def test_changes_computed_elsewhere_are_recorded_as_duckdb_records_its_own(warehouse):
    """Spark's diff computes the events; `record_computed_changes` records them by DuckDB's own
    steps: the same outbox rows (ids, backfill, held batches), batches and intervals."""
    from condition_harness import connect_memory, insert_users

    from audiences.membership.changes import record_computed_changes

    breaker = CircuitBreaker(share=0.2, minimum=3)
    evaluations = [
        (T0, {"pro": list(range(1, 11)), "free": [1]}),
        (T0 + timedelta(hours=1), {"pro": [1, 2], "free": [1, 3]}),  # pro: 8 of 10 leave, held
        (T0 + timedelta(hours=2), {"pro": [1, 2, 4], "free": [3], "new": [5]}),
    ]
    elsewhere = connect_memory()
    insert_users(elsewhere, [{"id": f"u{i}"} for i in range(1, 11)])
    for number, (moment, members) in enumerate(evaluations):
        evaluate(warehouse, moment, members, breaker=breaker)
        computed = warehouse.execute(
            "select event_id, audience_key, user_key, user_id, tenant, event_type, entry_number "
            "from raw.membership_outbox join raw.users using (user_id) where occurred_at = $t",
            {"t": moment},
        ).fetchall()
        elsewhere.execute(
            "create or replace table computed_events (event_id varchar, audience_key varchar, "
            "user_key integer, user_id varchar, tenant varchar, event_type varchar, "
            "entry_number integer)"
        )
        elsewhere.executemany("insert into computed_events values (?, ?, ?, ?, ?, ?, ?)", computed)
        elsewhere.execute(
            "create or replace table computed_catalog as select unnest($keys) as audience_key, "
            "'v1' as audience_version",
            {"keys": sorted(members)},
        )
        summary = record_computed_changes(
            elsewhere, moment, breaker, "computed_events", "computed_catalog", f"run-{number}"
        )
        assert summary is not None
        assert (
            record_computed_changes(
                elsewhere, moment, breaker, "computed_events", "computed_catalog", f"run-{number}"
            )
            is None
        ), "a run is recorded once"
    for table, columns in (
        ("raw.membership_outbox", "* exclude (sequence)"),
        ("raw.membership_batches", "* exclude (last_sequence)"),
        ("raw.membership_intervals", "*"),
        ("raw.membership_audiences", "*"),
    ):
        query = f"select {columns} from {table} order by all"
        assert elsewhere.execute(query).fetchall() == warehouse.execute(query).fetchall(), table
    assert any(
        row[-1]
        for row in warehouse.execute("select batch_id from raw.membership_outbox").fetchall()
    )

    # An exit of a membership not open here: the histories differ, nothing is recorded.
    elsewhere.execute("delete from computed_events")
    elsewhere.execute(
        "insert into computed_events values ('x', 'free', 9, 'u9', null, 'exited', 1)"
    )
    with pytest.raises(ValueError, match="not open here"):
        record_computed_changes(
            elsewhere,
            T0 + timedelta(hours=3),
            breaker,
            "computed_events",
            "computed_catalog",
            "bad",
        )
    assert elsewhere.execute("select count(*) from raw.recorded_runs").fetchall()[0][0] == 3
