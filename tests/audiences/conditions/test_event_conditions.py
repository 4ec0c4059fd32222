"""Event conditions (`performed`, `last_performed_before/after`): compiled SQL against the reference.

Events go through the real loader (a JSON-lines file in Segment's track shape, dedupe and
quarantine included) into a real DuckDB; the compiled conditions run over them inline and through
the generated dbt model, and the reference evaluator reads the same raw events.
"""

from __future__ import annotations

import json
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from condition_harness import (
    NOW,
    connect_memory,
    insert_users,
    load_events,
    matching_ids,
    model_matching_ids,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlglot import exp

from audiences.conditions.compiler import (
    CompileContext,
    Condition,
    ConditionError,
    attribute_expression,
    attributes_used,
    compile_segments,
    event_state,
    event_state_sql,
    property_json,
    render,
    timestamp_literal,
)
from audiences.conditions.definitions import (
    DefinitionError,
    knock_incompatibilities,
    parse_definition,
)
from audiences.conditions.reference import evaluate_audience
from audiences.dbt.models import events_of_users


def iso(moment) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event(user, name, at, message_id, **properties) -> dict:
    return {
        "userId": user,
        "event": name,
        "timestamp": iso(at) if not isinstance(at, str) else at,
        "messageId": message_id,
        "properties": properties,
    }


def compiled(tmp_path, users, events, conditions, now=NOW) -> set[str]:
    connection = connect_memory()
    insert_users(connection, users)
    load_events(connection, events, tmp_path / "events")
    segments = [[Condition.from_json(c) for c in conditions]]
    inline = matching_ids(connection, segments, now)
    model = model_matching_ids(connection, [conditions], now)
    assert inline == model
    return inline


def reference(users, events, conditions, now=NOW) -> set[str]:
    audience = {"segments": [{"conditions": conditions}]}
    return {u["id"] for u in users if evaluate_audience(audience, u, now=now, events=events)}


def performed(name="Order Completed", **argument) -> dict:
    return {
        "property": "recipient",
        "operator": "performed",
        "argument": {"event": name, **argument},
    }


USERS = [{"id": "ann"}, {"id": "bob"}, {"id": "cat"}]


def test_the_window_is_open_before_and_closed_at_now(tmp_path):
    day = timedelta(days=1)
    events = [
        event("ann", "Order Completed", NOW - 30 * day, "a1"),  # exactly now - 30 days: outside
        event("bob", "Order Completed", NOW - 30 * day + timedelta(microseconds=1), "b1"),
        event("cat", "Order Completed", NOW, "c1"),  # exactly now: inside
        event("cat", "Order Completed", NOW + timedelta(seconds=1), "c2"),  # not yet happened
    ]
    condition = performed(count={"at_least": 1}, within="30 days")
    assert compiled(tmp_path, USERS, events, [condition]) == {"bob", "cat"}
    assert reference(USERS, events, [condition]) == {"bob", "cat"}
    exactly_one = performed(count={"exactly": 1}, within={"value": 30, "unit": "days"})
    assert compiled(tmp_path / "2", USERS, events, [exactly_one]) == {"bob", "cat"}


def test_a_message_id_seen_before_counts_once_and_bad_rows_do_not_count(tmp_path):
    day = timedelta(days=1)
    events = [
        event("ann", "Order Completed", NOW - day, "m1"),
        event("ann", "Order Completed", NOW - day, "m1"),  # the same event again
        event("ann", "Order Completed", NOW - 2 * day, "m2"),
        event("ann", "Order Completed", "yesterday", "m3"),  # quarantined: no timestamp
        {"event": "Order Completed", "timestamp": iso(NOW), "messageId": "m4"},  # no user
        event("ann", "Order Completed", NOW - 3 * day, "m2"),  # same id as an earlier one
    ]
    at_least_3 = performed(count={"at_least": 3}, within="7 days")
    exactly_2 = performed(count={"exactly": 2})
    assert compiled(tmp_path, USERS, events, [at_least_3]) == set()
    assert reference(USERS, events, [at_least_3]) == set()
    assert compiled(tmp_path / "2", USERS, events, [exactly_2]) == {"ann"}
    assert reference(USERS, events, [exactly_2]) == {"ann"}


def test_at_most_zero_is_did_not_perform_and_last_performed_needs_an_event(tmp_path):
    day = timedelta(days=1)
    events = [
        event("ann", "Signed Up", NOW - 10 * day, "s1"),
        event("bob", "Signed Up", NOW - 10 * day, "s2"),
        event("bob", "Order Completed", NOW - 5 * day, "o1"),
    ]
    signed_up_no_order = [
        {
            "property": "recipient",
            "operator": "last_performed_before",
            "argument": {"event": "Signed Up", "time": "7 days ago"},
        },
        performed(count={"at_most": 0}, within="7 days"),
    ]
    assert compiled(tmp_path, USERS, events, signed_up_no_order) == {"ann"}
    assert reference(USERS, events, signed_up_no_order) == {"ann"}
    after = [
        {
            "property": "recipient",
            "operator": "last_performed_after",
            "argument": {"event": "Order Completed", "time": iso(NOW - 5 * day)},
        }
    ]
    # on or after, like is_timestamp_on_or_after; cat never ordered and matches neither
    assert compiled(tmp_path / "2", USERS, events, after) == {"bob"}


def test_where_filters_on_event_properties_with_the_property_rules(tmp_path):
    day = timedelta(days=1)
    events = [
        event("ann", "Order Completed", NOW - day, "o1", total=120, currency="EUR"),
        event("ann", "Order Completed", NOW - day, "o2", total="80"),
        event("bob", "Order Completed", NOW - day, "o3", total="150"),
        event("cat", "Order Completed", NOW - day, "o4"),
    ]
    big = performed(
        count={"at_least": 1},
        where=[{"property": "data.total", "operator": "greater_than", "argument": "100"}],
    )
    assert compiled(tmp_path, USERS, events, [big]) == {"ann", "bob"}
    no_currency = performed(
        count={"at_least": 1}, where=[{"property": "data.currency", "operator": "empty"}]
    )
    assert compiled(tmp_path / "2", USERS, events, [no_currency]) == {"ann", "bob", "cat"}
    assert reference(USERS, events, [no_currency]) == {"ann", "bob", "cat"}


def test_events_of_a_user_loaded_later_count_once_the_user_exists(tmp_path):
    events = [event("dan", "Order Completed", NOW - timedelta(days=1), "d1")]
    condition = performed(count={"at_least": 1})
    assert compiled(tmp_path, USERS, events, [condition]) == set()
    assert compiled(tmp_path / "2", [*USERS, {"id": "dan"}], events, [condition]) == {"dan"}


@pytest.mark.parametrize(
    ("argument", "field", "message"),
    [
        ({"event": "X"}, "argument.count", "needs a `count`"),
        ({"event": "X", "count": {"at_least": -1}}, "argument.count.at_least", "0 or more"),
        ({"event": "X", "count": {"at_least": 1.5}}, "argument.count.at_least", "whole number"),
        ({"event": "X", "count": {"more_than": 1}}, "argument.count", "at_least"),
        ({"event": "X", "count": {"at_least": 1}, "within": "soon"}, "argument.within", "duration"),
        ({"event": "X", "count": {"at_least": 1}, "within": "5 minutes"}, "argument.within", "15"),
        ({"event": "", "count": {"at_least": 1}}, "argument.event", "non-empty"),
        ({"event": "X", "count": {"at_least": 1}, "every": 2}, "argument.every", "unknown key"),
        (
            {
                "event": "X",
                "count": {"at_least": 1},
                "where": [{"property": "plan", "operator": "exists"}],
            },
            "argument.where[0].property",
            "data.<property>",
        ),
        (
            {
                "event": "X",
                "count": {"at_least": 1},
                "where": [{"property": "data.n", "operator": "greater_than", "argument": "x"}],
            },
            "argument.where[0].argument",
            "not a number",
        ),
    ],
)
def test_malformed_event_arguments_name_the_field(argument, field, message):
    raw = {
        "name": "Bad",
        "type": "dynamic",
        "segments": [
            {
                "conditions": [
                    {"property": "recipient", "operator": "performed", "argument": argument}
                ]
            }
        ],
    }
    with pytest.raises(DefinitionError) as caught:
        parse_definition(raw, "bad", Path("bad/audience.json"))
    (problem,) = caught.value.problems
    assert problem.json_path == f"$.segments[0].conditions[0].{field}"
    assert message in problem.message


def test_an_event_definition_is_valid_but_not_pushable_to_knock():
    raw = {
        "name": "Buyers",
        "type": "dynamic",
        "segments": [
            {"conditions": [{"property": "plan", "operator": "equal_to", "argument": "pro"}]},
            {"conditions": [performed(count={"at_least": 3}, within="30 days")]},
        ],
    }
    definition = parse_definition(raw, "buyers", Path("buyers/audience.json"))
    (problem,) = knock_incompatibilities(definition)
    assert problem.json_path == "$.segments[1].conditions[0].operator"
    assert "cannot be pushed to Knock" in problem.message
    # Event conditions read no user attribute.
    assert attributes_used(definition.segments) == {
        a for a in attributes_used(definition.segments[:1])
    }
    with pytest.raises(ConditionError):
        Condition.from_json({"property": "recipient", "operator": "performd", "argument": {}})


# --- property-based: random event streams and conditions ---------------------------------------

NAMES = ["Order Completed", "order completed", "Signed Up", 'it\'s "{{ x }}" %_\n', "東京"]
# Mostly one name, so that conditions and events meet often.
names = st.one_of(st.just("Order Completed"), st.just("Order Completed"), st.sampled_from(NAMES))
HOSTILE = ["pro", "", "{{ x }}", "a'b", '"q"', "5", 5, 120.5, None, True, ["a"], {"a": 1}]
# Times at and around the window edges (now - 1 day, now - 7 days) and after now.
OFFSETS = [
    timedelta(0),
    timedelta(microseconds=1),
    -timedelta(microseconds=1),
    timedelta(days=1),
    timedelta(days=1, microseconds=1),
    timedelta(days=1, microseconds=-1),
    timedelta(days=7),
    timedelta(days=7, microseconds=1),
    timedelta(days=3),
    timedelta(days=400),
    -timedelta(hours=2),
]


@st.composite
def event_streams(draw) -> list[dict]:
    stream = []
    ids = [f"m{index}" for index in range(8)]
    for _ in range(draw(st.integers(0, 16))):
        item = {
            "userId": draw(st.sampled_from(["ann", "ann", "bob", "cat", "dan", ""])),
            "event": draw(names),
            "timestamp": iso(NOW - draw(st.sampled_from(OFFSETS))),
            "messageId": draw(st.sampled_from(ids)),  # duplicates are likely
            "properties": draw(
                st.fixed_dictionaries(
                    {},
                    optional={"plan": st.sampled_from(HOSTILE), "total": st.sampled_from(HOSTILE)},
                )
            ),
        }
        if draw(st.integers(0, 12)) == 0:
            item["timestamp"] = "2026-02-30T00:00:00Z"  # quarantined
        stream.append(item)
    return stream


WHERES = [
    {"property": "data.plan", "operator": "equal_to", "argument": "pro"},
    {"property": "data.total", "operator": "greater_than", "argument": "100"},
    {"property": "data.plan", "operator": "not_exists"},
    {"property": "data.plan", "operator": "contains", "argument": "{{"},
    {"property": "data.total", "operator": "is_timestamp_before", "argument": "1 day ago"},
]
TIMES = ["1 day ago", "7 days ago", iso(NOW - timedelta(days=3)), 1790000000, "2 weeks from now"]
WITHINS = [
    None,
    "1 day",
    "7_days",
    {"value": 1, "unit": "day"},
    {"after": "7 days ago"},
    {"after": iso(NOW - timedelta(days=7)), "before": iso(NOW - timedelta(days=1))},
]


@st.composite
def event_conditions(draw) -> dict:
    argument: dict = {"event": draw(names)}
    if draw(st.booleans()):
        argument["where"] = draw(st.lists(st.sampled_from(WHERES), max_size=2))
    operator = draw(
        st.sampled_from(["performed", "performed", "last_performed_before", "last_performed_after"])
    )
    if operator == "performed":
        argument["count"] = {
            draw(st.sampled_from(["at_least", "at_most", "exactly"])): draw(st.integers(0, 3))
        }
        within = draw(st.sampled_from(WITHINS))
        if within is not None:
            argument["within"] = within
    else:
        argument["time"] = draw(st.sampled_from(TIMES))
    if draw(st.booleans()):
        argument = json.dumps(argument)  # a Knock argument is often JSON text
    return {"property": "recipient", "operator": operator, "argument": argument}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_streams(), st.lists(event_conditions(), min_size=1, max_size=2))
def test_compiled_event_conditions_match_the_reference(stream, conditions):
    users = [{"id": "ann", "plan": "pro"}, {"id": "bob"}, {"id": "cat"}]
    with tempfile.TemporaryDirectory() as folder:
        assert compiled(Path(folder), users, stream, conditions) == reference(
            users, stream, conditions
        )


def test_a_bound_read_from_the_user_is_compared_per_user(tmp_path):
    day = timedelta(days=1)
    users = [
        {"id": "ann", "trial_ends_at": iso(NOW - 3 * day)},
        {"id": "bob", "trial_ends_at": iso(NOW - 10 * day)},
        {"id": "cat"},
    ]
    events = [event(u, "Order Completed", NOW - 5 * day, f"o-{u}") for u in ("ann", "bob", "cat")]
    before_trial_end = [
        {
            "property": "recipient",
            "operator": "last_performed_before",
            "argument": {"event": "Order Completed", "time": "{{ recipient.trial_ends_at }}"},
        }
    ]
    assert compiled(tmp_path, users, events, before_trial_end) == {"ann"}
    assert reference(users, events, before_trial_end) == {"ann"}
    none_after = [
        performed(count={"at_most": 0}, within={"after": "{{ recipient.trial_ends_at }}"})
    ]
    # cat has no trial end: a bound the user lacks counts nothing, so "at most 0" holds
    assert compiled(tmp_path / "2", users, events, none_after) == {"ann", "cat"}
    assert reference(users, events, none_after) == {"ann", "cat"}


# --- re-evaluating some users over their own events (audience_members' events_to_reevaluate) ----

USER_IDS = ["ann", "bob", "cat", "dan", 'it\'s "{{ x }}"', "東京", "ann "]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    event_streams(),
    st.lists(st.sampled_from(USER_IDS), max_size=6),
    st.lists(event_conditions(), min_size=1, max_size=2),
    st.sets(st.sampled_from(USER_IDS)),
    st.integers(1, 3),
)
def test_users_reevaluated_over_their_own_events_match_a_full_evaluation(
    stream, owners, conditions, listed, batches
):
    """The events of the listed users, selected by the numbers the loader gives user ids
    (`events_of_users`, loaded in several batches, user ids hostile), give those users the verdicts
    a full evaluation over every event gives them."""

    for index, owner in enumerate(owners[: len(stream)]):
        stream[index]["userId"] = owner
    users = [{"id": user} for user in USER_IDS]
    segments = [[Condition.from_json(c) for c in conditions]]
    with tempfile.TemporaryDirectory() as folder:
        connection = connect_memory()
        insert_users(connection, users)
        size = -(-len(stream) // batches) or 1
        for start in range(0, max(len(stream), 1), size):
            load_events(connection, stream[start : start + size], Path(folder) / "events")
        full = matching_ids(connection, segments)
        connection.execute("create temp table listed (user_id varchar)")
        connection.execute(
            "insert into listed select unnest($ids::varchar[])", {"ids": sorted(listed)}
        )
        connection.execute(
            "create temp table their_events as "
            + events_of_users("listed", events="raw.events", event_users="raw.event_users")
        )
        context = CompileContext(
            attribute=lambda a: attribute_expression(
                property_json(a.path, exp.column("properties"), exp.column("user_id")), a.variant
            ),
            audience_members=lambda key: exp.select("user_key").from_("raw.users"),
            evaluation_time=timestamp_literal(NOW),
            user_key=exp.column("user_key"),
            user_id=exp.column("user_id"),
            events=exp.to_table("their_events"),
        )
        condition = render(compile_segments(segments, context))
        again = {
            row[0]
            for row in connection.execute(
                f"select user_id from raw.users where user_id in (select user_id from listed) "
                f"and {condition}"
            ).fetchall()
        }
    assert again == full & set(listed)


# --- the event state (int_event_state): built once, then kept from new events alone -------------
# A full rebuild and any sequence of incremental builds give the same members: at each step the
# state is updated as the generated model does (rows of the users with new events or a due verdict,
# replaced by (state_key, user_number)), only the users it lists are re-evaluated (new events, or a
# `due_at` that "now" moved over), and the members equal the reference over every event so far.

# Evaluation times where verdicts change: when an event is reached (its time), leaves a 1-day or
# 7-day window (its time plus that), or crosses a "1 day ago" / "7 days ago" bound (a microsecond
# later); each also a microsecond before and after.
EDGES = sorted(
    {
        NOW - offset + length + tick
        for offset in OFFSETS
        for length in (timedelta(0), timedelta(days=1), timedelta(days=7))
        for tick in (-timedelta(microseconds=1), timedelta(0), timedelta(microseconds=1))
    }
)


def state_context(now, events="raw.events", state="state_ids") -> CompileContext:
    return CompileContext(
        attribute=lambda a: attribute_expression(
            property_json(a.path, exp.column("properties"), exp.column("user_id")), a.variant
        ),
        audience_members=lambda key: exp.select("user_key").from_("raw.users"),
        evaluation_time=timestamp_literal(now),
        user_key=exp.column("user_key"),
        user_id=exp.column("user_id"),
        events=exp.to_table(events),
        event_state=exp.to_table(state),
    )


def update_state(connection, conditions: list[Condition], now) -> set[str]:
    """One build of the state at `now`, as int_event_state runs it; returns the users it lists
    for re-evaluation (as int_event_users_to_reevaluate: events loaded since the last build, and
    rows whose `due_at` lies after the last build's "now"). As the model: a condition is kept
    incrementally from its marker row kept at or before `now` (event_state_markers), else
    recomputed from every event with `due_at` = now; dbt's delete+insert replaces only the
    (key, user) pairs of the new rows; the post-hook drops the conditions no longer used."""
    through = connection.execute("select coalesce(max(event_seq), 0) from raw.events").fetchone()[0]
    context = state_context(now)
    first = not connection.execute(
        "select count(*) from information_schema.tables where table_name = 'state'"
    ).fetchone()[0]
    previous_now, after = (
        (None, 0)
        if first
        else connection.execute(
            "select max(evaluated_at), max(events_through) from state where user_number = -1"
        ).fetchone()
    )
    if first:
        rows = event_state_sql(conditions, context, exp.Literal.number(through))
    else:
        marked = dict(
            connection.execute(
                "select state_key, events_through from state "
                "where user_number = -1 and evaluated_at <= $now",
                {"now": now},
            ).fetchall()
        )
        rows = event_state_sql(
            conditions,
            context,
            exp.Literal.number(through),
            previous=exp.to_table("state"),
            markers=lambda key: (
                exp.Literal.number(marked.get(key, 0)),
                exp.true() if key in marked else exp.false(),
            ),
            due=timestamp_literal(now),
        )
    if first:
        connection.execute("create table state as " + rows)
        connection.execute(
            "create view state_ids as select * from state join raw.event_users using (user_number)"
        )
        assert_next_changes_ahead(connection, now)
        return set()
    connection.execute("create or replace temp table fresh as " + rows)
    connection.execute(
        "delete from state using fresh where state.state_key = fresh.state_key "
        "and state.user_number = fresh.user_number"
    )
    connection.execute("insert into state select * from fresh")
    keys = sorted({state.key for state in map(event_state, conditions) if state is not None})
    connection.execute(
        "delete from state where not list_contains($keys, state_key)", {"keys": keys}
    )
    assert_next_changes_ahead(connection, now)
    listed = connection.execute(
        "select user_id from raw.events where event_seq > $after "
        "union select user_id from state join raw.event_users using (user_number) "
        "where due_at > $previous and due_at <= $now",
        {"after": after, "previous": previous_now, "now": now},
    ).fetchall()
    return {row[0] for row in listed}


def assert_next_changes_ahead(connection, now) -> None:
    """After a build, every kept verdict's next change lies after "now": a row left due would be
    recomputed at every later build (not proportional to the verdicts that change)."""
    stale = connection.execute(
        "select state_key, user_number, next_change from state where next_change <= $now",
        {"now": now},
    ).fetchall()
    assert stale == [], stale


def state_members(connection, segments, now) -> set[str]:
    condition = render(compile_segments(segments, state_context(now)))
    return {
        row[0]
        for row in connection.execute(f"select user_id from raw.users where {condition}").fetchall()
    }


def stateful_conditions():
    """Event conditions that keep a state (no bound read from the user)."""
    return event_conditions().filter(lambda raw: event_state(Condition.from_json(raw)) is not None)


LAPSES = [
    # an order leaves "at least 1 in 1 day" exactly 1 day after it, not a microsecond before
    (
        [[event("ann", "Order Completed", NOW, "o1")]],
        [NOW, NOW + timedelta(days=1, microseconds=-1), NOW + timedelta(days=1)],
        [performed(count={"at_least": 1}, within="1 day")],
    ),
    # "at most 1 in 1 day" holds again when the 2nd most recent order leaves; a late order
    (
        [
            [event("ann", "Order Completed", NOW, "o1")],
            [event("ann", "Order Completed", NOW - timedelta(hours=2), "o2")],
            [],
        ],
        [NOW, NOW + timedelta(hours=1), NOW + timedelta(days=1, hours=-2)],
        [performed(count={"at_most": 1}, within="1 day")],
    ),
    # "last performed before 1 day ago" a microsecond after the last order plus 1 day, not at it
    (
        [[event("bob", "Order Completed", NOW, "o1")]],
        [NOW, NOW + timedelta(days=1), NOW + timedelta(days=1, microseconds=1)],
        [
            {
                "property": "recipient",
                "operator": "last_performed_before",
                "argument": {"event": "Order Completed", "time": "1 day ago"},
            }
        ],
    ),
    # an order stamped after "now" counts when "now" reaches it; the same id again counts once
    (
        [
            [event("cat", "Order Completed", NOW + timedelta(hours=2), "o1")],
            [event("cat", "Order Completed", NOW + timedelta(hours=2), "o1")],
        ],
        [NOW, NOW + timedelta(hours=2)],
        [performed(count={"exactly": 1}, within="7 days")],
    ),
]


def _replay(batches, steps, conditions, listing, verdicts_too: bool) -> None:
    """Evaluations at `steps`, each after its batch of events, the state updated and the users
    `listing` names re-evaluated: members equal the reference at every step (and, with
    `verdicts_too`, so do the state's verdicts of every user)."""
    users = [{"id": "ann", "plan": "pro"}, {"id": "bob"}, {"id": "cat"}]
    segments = [[Condition.from_json(c) for c in conditions]]
    times = sorted(steps)
    # A batch per evaluation; an evaluation without a batch is time passing with no new event.
    batches = (batches + [[]] * len(times))[: len(times)]
    loaded: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        connection = connect_memory()
        insert_users(connection, users)
        members: set[str] = set()
        for step, (now, batch) in enumerate(zip(times, batches, strict=True)):
            if batch:
                load_events(connection, batch, Path(folder) / "events")
            loaded += batch
            listed = listing(connection, [c for s in segments for c in s], now)
            verdicts = state_members(connection, segments, now)
            members = verdicts if step == 0 else (members - listed) | (verdicts & listed)
            if verdicts_too:
                assert verdicts == reference(users, loaded, conditions, now), f"state at {now}"
            assert members == reference(users, loaded, conditions, now), f"listed at {now}"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(event_streams(), min_size=1, max_size=3),
    st.lists(st.sampled_from(EDGES), min_size=1, max_size=5),
    st.lists(stateful_conditions(), min_size=1, max_size=2),
)
@example(*LAPSES[0])
@example(*LAPSES[1])
@example(*LAPSES[2])
@example(*LAPSES[3])
def test_incremental_builds_of_the_event_state_match_a_full_evaluation(batches, steps, conditions):
    _replay(batches, steps, conditions, update_state, verdicts_too=True)


def test_a_verdict_is_due_the_moment_the_window_lapses(tmp_path):
    """ "At least 2 within 1 day": due when the 2nd most recent order is 1 day old, not a
    microsecond later (it left the window then) nor earlier; "last performed before 1 day ago":
    a microsecond after the last time plus 1 day (strictly before)."""
    day, tick = timedelta(days=1), timedelta(microseconds=1)
    connection = connect_memory()
    insert_users(connection, USERS)
    orders = [event("ann", "Order Completed", NOW - timedelta(hours=h), f"o{h}") for h in (1, 5, 9)]
    load_events(connection, orders, tmp_path / "events")
    twice = Condition.from_json(performed(count={"at_least": 2}, within="1 day"))
    last = Condition.from_json(
        {
            "property": "recipient",
            "operator": "last_performed_before",
            "argument": {"event": "Order Completed", "time": "1 day ago"},
        }
    )
    update_state(connection, [twice, last], NOW)
    due = dict(
        connection.execute(
            "select state_key, next_change from state_ids where user_id = 'ann'"
        ).fetchall()
    )
    assert due[event_state(twice).key] == NOW - timedelta(hours=5) + day
    assert due[event_state(last).key] == NOW - timedelta(hours=1) + day + tick
    assert update_state(connection, [twice, last], NOW + day - timedelta(hours=5) - tick) == set()
    assert update_state(connection, [twice, last], NOW + day - timedelta(hours=5)) == {"ann"}
    assert state_members(connection, [[twice]], NOW + day - timedelta(hours=5)) == set()


# --- only the users whose verdict changed are re-evaluated (`holds`, `changed_at`) --------------
# int_event_users_to_reevaluate lists the users with a state row whose verdict a build changed
# since the last evaluation (`changed_at`), not every user with a new event: a new order of a
# user who already ordered in the window changes no member and re-evaluates no one.


def changed_listing(connection, conditions: list[Condition], now) -> set[str]:
    """One build of the state at `now` (as `update_state`), and the users it lists as
    int_event_users_to_reevaluate does: rows whose `changed_at` lies after the last build's
    "now", or is this one, when time went back or by events the last build did not cover."""
    previous_now, after = None, 0
    if connection.execute(
        "select count(*) from information_schema.tables where table_name = 'state'"
    ).fetchone()[0]:
        previous_now, after = connection.execute(
            "select max(evaluated_at), max(events_through) from state where user_number = -1"
        ).fetchone()
    update_state(connection, conditions, now)
    listed = connection.execute(
        "select user_id from state join raw.event_users using (user_number) "
        "where (changed_at > $previous and changed_at <= $now) or (changed_at = $now "
        "and (coalesce($previous > $now, true) or events_through > $after))",
        {"previous": previous_now, "now": now, "after": after},
    ).fetchall()
    return {row[0] for row in listed}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(event_streams(), min_size=1, max_size=3),
    st.lists(st.sampled_from(EDGES), min_size=1, max_size=5),
    st.lists(stateful_conditions(), min_size=1, max_size=2),
)
@example(*LAPSES[0])
@example(*LAPSES[1])
@example(*LAPSES[2])
@example(*LAPSES[3])
# bob's first order arrives after the first build: a row new to the state changes his verdict
@example(
    [
        [event("ann", "Order Completed", NOW - timedelta(hours=1), "o1")],
        [event("bob", "Order Completed", NOW, "o2")],
    ],
    [NOW, NOW + timedelta(hours=1)],
    [performed(count={"at_least": 1}, within="1 day")],
)
def test_reevaluating_only_the_users_whose_verdict_changed_matches_a_full_evaluation(
    batches, steps, conditions
):
    _replay(batches, steps, conditions, changed_listing, verdicts_too=False)


def test_a_new_event_that_changes_no_verdict_lists_no_one(tmp_path):
    connection = connect_memory()
    insert_users(connection, USERS)
    load_events(
        connection, [event("ann", "Order Completed", NOW - timedelta(hours=2), "o1")], tmp_path
    )
    ordered = Condition.from_json(performed(count={"at_least": 1}, within="7 days"))
    assert changed_listing(connection, [ordered], NOW) == set()
    # ann orders again (still a buyer), bob orders for the first time
    load_events(
        connection,
        [
            event("ann", "Order Completed", NOW - timedelta(hours=1), "o2"),
            event("bob", "Order Completed", NOW - timedelta(minutes=30), "o3"),
        ],
        tmp_path,
    )
    later = NOW + timedelta(minutes=1)
    assert changed_listing(connection, [ordered], later) == {"bob"}
    assert state_members(connection, [[ordered]], later) == {"ann", "bob"}
    # nothing new: no one; nor again at the same "now"; a new event at the same "now" does
    assert changed_listing(connection, [ordered], later + timedelta(minutes=1)) == set()
    assert changed_listing(connection, [ordered], later + timedelta(minutes=1)) == set()
    load_events(
        connection, [event("cat", "Order Completed", NOW - timedelta(hours=3), "o4")], tmp_path
    )
    assert changed_listing(connection, [ordered], later + timedelta(minutes=1)) == {"cat"}


def test_a_kept_verdict_is_read_only_while_it_is_current(tmp_path):
    """`holds` is the verdict at the build's "now" until the row's next change: evaluated later
    without a build in between, the kept times decide."""
    connection = connect_memory()
    insert_users(connection, USERS)
    orders = [event("ann", "Order Completed", NOW - timedelta(hours=2), "o1")]
    load_events(connection, orders, tmp_path)
    day = Condition.from_json(performed(count={"at_least": 1}, within="1 day"))
    update_state(connection, [day], NOW)
    lapse = NOW + timedelta(hours=22)  # the order leaves the window then
    raw = [performed(count={"at_least": 1}, within="1 day")]
    for moment in (NOW, lapse - timedelta(microseconds=1), lapse, lapse + timedelta(days=3)):
        assert state_members(connection, [[day]], moment) == reference(
            USERS, orders, raw, moment
        ), moment


# --- time going back, definitions changing: a condition recomputed whole over a kept state -------
# A condition kept at a later "now" (time went back) or new to the state is recomputed from every
# event, and dbt's delete+insert replaces only the (key, user) pairs it writes: a user left with
# no row keeps the older one. Such a user has no qualifying event after the window's start at this
# "now" (every one, past or future, has a new row), so the row kept says what no row says: its
# `holds` is false (a true verdict counted an event, which would have a new row) and its times
# count nothing at this "now" or later.


def _replay_any_order(batches, steps, pool, picks) -> None:
    """Builds at `steps` in the given order (time may go back), each after its batch, of the
    conditions of `pool` that `picks` chooses (a condition may come, go and come back), each
    condition its own audience: the state's verdicts equal the reference at every step, and so
    do members kept by re-evaluating the users `changed_listing` names (an audience new at a
    step is evaluated whole)."""
    users = [{"id": "ann", "plan": "pro"}, {"id": "bob"}, {"id": "cat"}]
    batches = (batches + [[]] * len(steps))[: len(steps)]
    picks = (picks + [picks[-1]] * len(steps))[: len(steps)]
    loaded: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        connection = connect_memory()
        insert_users(connection, users)
        members: dict[int, set[str]] = {}
        for now, batch, pick in zip(steps, batches, picks, strict=True):
            if batch:
                load_events(connection, batch, Path(folder) / "events")
            loaded += batch
            chosen = sorted({index % len(pool) for index in pick})
            conditions = {index: Condition.from_json(pool[index]) for index in chosen}
            listed = changed_listing(connection, list(conditions.values()), now)
            members = {index: members.get(index) for index in chosen}
            for index, condition in conditions.items():
                verdicts = state_members(connection, [[condition]], now)
                kept = members[index]
                members[index] = verdicts if kept is None else (kept - listed) | (verdicts & listed)
                expected = reference(users, loaded, [pool[index]], now)
                assert verdicts == expected, f"state of {pool[index]} at {now}"
                assert members[index] == expected, f"listed of {pool[index]} at {now}"


def test_rows_left_by_a_condition_recomputed_whole_say_what_no_row_says(tmp_path):
    """Time goes back past ann's and bob's windows: the recomputed conditions write no row for
    them and their older rows stay (one built at the later "now", one before it), yet members
    equal the reference at every step; a condition dropped and added back starts over."""
    day, hour = timedelta(days=1), timedelta(hours=1)
    orders = [
        event("ann", "Order Completed", NOW - 2 * hour, "o1"),
        event("bob", "Order Completed", NOW - 3 * day, "o2"),
        event("cat", "Order Completed", NOW + 2 * hour, "o3"),
    ]
    once = performed(count={"at_least": 1}, within="1 day")
    never = performed(count={"at_most": 0}, within="1 day")
    twice = performed(count={"at_least": 2}, within="1 day")
    recent = {
        "property": "recipient",
        "operator": "last_performed_after",
        "argument": {"event": "Order Completed", "time": "1 day ago"},
    }
    pool = [once, never, twice, recent]
    steps = [NOW - 4 * day, NOW, NOW + 23 * hour, NOW + 22 * hour + timedelta(minutes=30)]
    steps += [NOW + hour, NOW + 3 * day, NOW + 2 * day, NOW + 2 * day + hour, NOW + 3 * day]
    _replay_any_order([orders], steps, pool, [[0, 1, 2, 3]] * 7 + [[0, 3]] + [[0, 1, 2, 3]])
    # the scenario happens: after time went back to NOW + 22h30, ann's rows of "within 1 day"
    # built at NOW + 23h (her order had left the window) stay, as no new row replaces them
    connection = connect_memory()
    insert_users(connection, USERS)
    load_events(connection, orders, tmp_path / "events")
    conditions = [Condition.from_json(c) for c in pool]
    for now in steps[:3]:
        update_state(connection, conditions, now)
    update_state(connection, conditions, steps[3])
    left = connection.execute(
        "select state_key, holds from state_ids where user_id = 'ann' and evaluated_at = $later",
        {"later": steps[2]},
    ).fetchall()
    assert sorted(left) == sorted((event_state(c).key, False) for c in conditions[:2]), left


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(event_streams(), min_size=1, max_size=3),
    st.lists(st.sampled_from(EDGES), min_size=2, max_size=5),
    st.lists(stateful_conditions(), min_size=1, max_size=3),
    st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=2), min_size=1, max_size=5),
)
def test_builds_with_time_going_back_and_changed_definitions_match_a_full_evaluation(
    batches, steps, pool, picks
):
    _replay_any_order(batches, steps, pool, picks)
