"""Property-based: the compiled SQL and the reference evaluator agree on random users and definitions.

Hypothesis draws messy users (missing, null, "", [], numeric strings, timestamps in several
shapes, nested objects that are sometimes scalars, unicode and hostile property names) and random
definitions using every operator family, then checks that the SQL (read inline from JSON, and
from the flattened typed columns that dbt builds) selects exactly the users the reference
evaluator accepts.
"""

from __future__ import annotations

import json

from condition_harness import NOW, connect_memory, insert_users, matching_ids, model_matching_ids
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from audiences.conditions.compiler import Condition
from audiences.conditions.reference import evaluate_audience

# Hostile names: quotes, backslashes, Jinja, LIKE wildcards, newlines, unicode (issue 13).
KEYS = [
    "plan",
    "n",
    "tags",
    "when",
    "address",
    'a"; drop table users; --',
    "ключ",
    '"quoted"',
    "it's\\{{ %_\n",
]
PATHS = [key for key in KEYS if key != "address"] + ["address.city", "address.zip"]
TEXTS = [
    "",
    "pro",
    "Pro",
    "5",
    "05",
    " 7",
    "1e3",
    "-2.50",
    "true",
    "null",
    "a",
    "ab",
    "東京",
    "{{ x }}",
    "2026-10-31T12:00:00Z",
    "2026-11-01",
    "2026-10-25 08:30",
    "2026-10-31T12:00:00+02:00",
    "yesterday",
    "2026-02-30",
    "1790000000",
    # text that looks like JSON, or holds what SQL, LIKE and Jinja treat specially
    '"q"',
    "'q'",
    'say "q"',
    "a\\b",
    '"a\\\\b"',
    "a\nb",
    "50%",
    "a_b",
    "%",
    "{% y %}",
    "{#",
    "NaN",
    '{"a": 1}',
    '"5"',
    '""',
    '"null"',
    '"\\u00e9"',
    "é",
    "1777593600",
]
NUMBERS = [0, 1, 5, 5.0, 6, -2.5, 10, 1000, 1.5e9, 1790000000, 1777593600.5]
scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(NUMBERS), st.sampled_from(TEXTS))
values = st.one_of(
    scalars,
    st.lists(
        st.one_of(
            st.sampled_from(TEXTS[:13] + TEXTS[21:]),
            st.sampled_from(NUMBERS[:5]),
            st.booleans(),
            st.none(),
            st.just(["a"]),
            st.just({"a": 1}),
        ),
        max_size=4,
    ),
    st.fixed_dictionaries({}, optional={"city": scalars, "zip": scalars}),
)


@st.composite
def users(draw) -> list[dict]:
    population = []
    for index in range(draw(st.integers(1, 6))):
        user = {"id": f"user_{index}"}
        for key in draw(st.lists(st.sampled_from(KEYS), unique=True)):
            user[key] = draw(values)
        population.append(user)
    return population


argument_texts = st.one_of(
    st.sampled_from(
        [
            *TEXTS,
            '["a","pro"]',
            '[5,"5"]',
            "[]",
            '[""]',
            '["\\"q\\"", "%"]',
            '[["a"]]',
            '[{"a": 1}]',
            "[null]",
            '"\\ud800"',
            "Infinity",
            "1e400",
        ]
    ),
    # arguments written as JSON values rather than text: no original text
    st.sampled_from([5, 5.0, 1790000000, True, None, ["a", 5], ['"q"'], {"a": 1}]),
)
# Absolute times equal to some of the values above, and relative ones that land on them, so the
# boundaries (before vs on-or-after, inclusive between) are exercised.
time_arguments = st.sampled_from(
    [
        "7 days ago",
        "1 day from now",
        "30_minutes_ago",
        "2026-10-31T12:00:00Z",
        "2026-11-01",
        "{{ recipient.when }}",
        "2 weeks ago",
        "2026-10-31T10:00:00Z",
        "2026-10-25T08:30:00Z",
        "720 minutes ago",
        # Unix seconds, as text or as a number, and a JSON-quoted date
        "1790000000",
        "1777593600.5",
        "1.5e9",
        1790000000,
        1777593600,
        '"2026-11-01"',
    ]
)

# Bounds of `[start, end]` are decoded values already: Unix seconds are numbers there.
time_bounds = st.sampled_from(
    [
        "7 days ago",
        "1 day from now",
        "2026-10-31T12:00:00Z",
        "2026-11-01",
        "{{ recipient.when }}",
        "2026-10-25T08:30:00Z",
        "720 minutes ago",
        1790000000,
        1777593600.5,
        1.5e9,
    ]
)


@st.composite
def conditions(draw) -> dict:
    family = draw(
        st.sampled_from(["value", "number", "range", "none", "time", "time_range", "member"])
    )
    path = "recipient." + draw(st.sampled_from(PATHS))
    if family == "value":
        operator = draw(
            st.sampled_from(
                [
                    "equal_to",
                    "not_equal_to",
                    "contains",
                    "not_contains",
                    "contains_all",
                    "not_contains_all",
                ]
            )
        )
        return {"property": path, "operator": operator, "argument": draw(argument_texts)}
    if family == "number":
        operator = draw(
            st.sampled_from(
                ["greater_than", "greater_than_or_equal_to", "less_than", "less_than_or_equal_to"]
            )
        )
        return {
            "property": path,
            "operator": operator,
            "argument": str(draw(st.sampled_from(NUMBERS))),
        }
    if family == "range":
        low, high = sorted(draw(st.lists(st.sampled_from(NUMBERS), min_size=2, max_size=2)))
        return {"property": path, "operator": "is_between", "argument": json.dumps([low, high])}
    if family == "none":
        operator = draw(
            st.sampled_from(
                [
                    "empty",
                    "not_empty",
                    "exists",
                    "not_exists",
                    "is_timestamp",
                    "is_not_timestamp",
                    "is_timestamp_before_now",
                    "is_timestamp_on_or_after_now",
                ]
            )
        )
        return {"property": path, "operator": operator}
    if family == "time":
        operator = draw(st.sampled_from(["is_timestamp_before", "is_timestamp_on_or_after"]))
        return {"property": path, "operator": operator, "argument": draw(time_arguments)}
    if family == "time_range":
        bounds = draw(st.lists(time_bounds, min_size=2, max_size=2))
        return {
            "property": path,
            "operator": "is_timestamp_between",
            "argument": json.dumps(bounds),
        }
    operator = draw(st.sampled_from(["is_audience_member", "is_not_audience_member"]))
    return {"property": "recipient", "operator": operator, "argument": "vips"}


definitions = st.lists(st.lists(conditions(), min_size=1, max_size=3), min_size=1, max_size=3)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(population=users(), segments=definitions, vip_indexes=st.sets(st.integers(0, 5)))
@example(
    population=[{"id": "user_0", '"quoted"': '"q"'}, {"id": "user_1", '"quoted"': "q"}],
    vip_indexes=set(),
    segments=[[{"property": 'recipient."quoted"', "operator": "equal_to", "argument": '"q"'}]],
)
@example(
    population=[{"id": "user_0", "when": "2026-09-08T00:00:00Z"}],
    vip_indexes=set(),
    segments=[
        [
            {
                "property": "recipient.when",
                "operator": "is_timestamp_before",
                "argument": "1788825601",
            }
        ]
    ],
)
def test_compiled_sql_agrees_with_reference_evaluator(population, segments, vip_indexes):
    vips = {f"user_{index}" for index in vip_indexes}
    audience = {"type": "dynamic", "segments": [{"conditions": segment} for segment in segments]}
    parsed = [[Condition.from_json(condition) for condition in segment] for segment in segments]
    expected = {
        user["id"]
        for user in population
        if evaluate_audience(
            audience, user, now=NOW, is_member=lambda key, user_id: user_id in vips
        )
    }
    connection = connect_memory()
    insert_users(connection, population)
    assert matching_ids(connection, parsed, members={"vips": vips}) == expected
    assert matching_ids(connection, parsed, flattened=True, members={"vips": vips}) == expected
    # and through the generated dbt model file, its Jinja rendered
    assert model_matching_ids(connection, segments, members={"vips": vips}) == expected
    # Each condition on its own too, so a wrong condition cannot hide behind the others.
    for raw, condition in zip(
        (c for segment in segments for c in segment),
        (c for segment in parsed for c in segment),
        strict=True,
    ):
        alone = {"type": "dynamic", "segments": [{"conditions": [raw]}]}
        accepted = {
            user["id"]
            for user in population
            if evaluate_audience(
                alone, user, now=NOW, is_member=lambda key, user_id: user_id in vips
            )
        }
        assert matching_ids(connection, [[condition]], members={"vips": vips}) == accepted, raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    population=users(),
    segments=definitions,
    vip_indexes=st.sets(st.integers(0, 5)),
    moved=st.sampled_from([-10080, -1440, -61, 15, 60, 720, 1440, 10080, 43200]),
)
@example(
    population=[{"id": "user_0", "when": "2026-10-31T12:00:00Z"}],
    vip_indexes=set(),
    moved=-1440,
    segments=[[{"property": "recipient.when", "operator": "is_timestamp_before_now"}]],
)
@example(
    population=[{"id": "user_0", "when": "2026-10-25T08:30:00Z"}],
    vip_indexes=set(),
    moved=1440,
    segments=[
        [
            {
                "property": "recipient.when",
                "operator": "is_timestamp_on_or_after",
                "argument": "7 days ago",
            }
        ]
    ],
)
@example(
    population=[{"id": "user_0", "when": "2026-11-01"}],
    vip_indexes=set(),
    moved=1440,
    segments=[
        [
            {
                "property": "recipient.when",
                "operator": "is_timestamp_between",
                "argument": '["2026-10-01T00:00:00Z", "1 day from now"]',
            }
        ]
    ],
)
def test_membership_changes_with_time_only_inside_the_compilers_time_windows(
    population, segments, vip_indexes, moved
):
    """`time_windows` is what lets audience_members re-evaluate a time-relative audience for few
    users: as "now" moves, a user whose timestamps lie outside every window keeps its membership.
    Checked with the reference evaluator, which knows nothing of windows."""
    from datetime import timedelta

    from audiences.conditions.compiler import time_windows
    from audiences.conditions.reference import read_property, timestamp_value

    vips = {f"user_{index}" for index in vip_indexes}
    audience = {"type": "dynamic", "segments": [{"conditions": segment} for segment in segments]}
    windows = time_windows(
        [[Condition.from_json(condition) for condition in segment] for segment in segments]
    )
    later = NOW + timedelta(minutes=moved)
    low, high = min(NOW, later), max(NOW, later)

    def near(user, window) -> bool:
        moment = timestamp_value(
            read_property(user, "recipient." + ".".join(window.attribute.path))
        )
        shift = timedelta(minutes=window.minutes)
        return moment is not None and low + shift <= moment <= high + shift

    far = [user for user in population if not any(near(user, window) for window in windows)]
    # An example whose every user lies near a window checks nothing: a skipped draw, not a pass.
    assume(far)
    for user in far:
        before, after = (
            evaluate_audience(
                audience, user, now=now, is_member=lambda key, user_id: user_id in vips
            )
            for now in (NOW, later)
        )
        assert before == after, (user, windows)
