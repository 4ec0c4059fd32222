"""The generated model that finds whom events re-evaluate: `int_event_users_to_reevaluate`.

An audience with event conditions (`performed`, `last_performed_before/after`) can change for a
user without any change to the user's data: when an event of theirs is loaded, and when "now"
moves over one of their events' times shifted by a window (an order leaves "the last 30 days" 30
days after it happened, with no new event). This model lists exactly those users, for
`int_users_to_reevaluate` to add as users "in a time window": new events since the last build of
`audience_members` (by `event_seq`, the order they were loaded in), and events whose times, shifted
by each `EventWindow` of the per-user event audiences, lie where "now" moved since that build.
"""

from __future__ import annotations

import json

from sqlglot import exp

from audiences.conditions.compiler import (
    EVENT_STATE_MARKER,
    EXTENSION_OPERATORS,
    CompileContext,
    Condition,
    EventWindow,
    event_state,
    event_state_sql,
    event_windows,
    render,
)
from audiences.conditions.definitions import AudienceDefinition

EVENT_REEVALUATE_MODEL = "int_event_users_to_reevaluate"
EVENT_STATE_MODEL = "int_event_state"
EVENTS_SOURCE = "{{ source('warehouse', 'events') }}"
USERS_MODEL = "stg_warehouse__users"


def windows_by_event(
    definitions: dict[str, AudienceDefinition], keys: set[str]
) -> dict[EventWindow, list[str]]:
    """The event windows of these (per-user) audiences, with the audiences that have each."""
    found: dict[EventWindow, list[str]] = {}
    for key in sorted(keys):
        # Conditions with a state are listed by their `due_at` (int_event_state), not by windows.
        counted = [
            [c for c in segment if c.operator not in EXTENSION_OPERATORS or event_state(c) is None]
            for segment in definitions[key].segments
        ]
        for window in event_windows(counted) or []:
            found.setdefault(window, []).append(key)
    return found


def state_conditions(
    definitions: dict[str, AudienceDefinition], keys: set[str]
) -> dict[str, tuple[Condition, list[str]]]:
    """The event conditions of these (per-user) audiences that keep a state, by state key, each
    with the audiences that have it."""
    found: dict[str, tuple[Condition, list[str]]] = {}
    for key in sorted(keys):
        for segment in definitions[key].segments:
            for condition in segment:
                state = (
                    event_state(condition) if condition.operator in EXTENSION_OPERATORS else None
                )
                if state is not None:
                    found.setdefault(state.key, (condition, []))[1].append(key)
    return dict(sorted(found.items()))


def event_state_model(
    definitions: dict[str, AudienceDefinition], keys: set[str], header: str
) -> str:
    """`int_event_state` for the event conditions with a state of these audiences (the per-user
    event audiences and those they read; templates/int_event_state.sql): the compiler's one
    statement for them, written twice, incremental (from the state and the new events, each
    condition by its marker row) and whole (from every event, the first build), with dbt's Jinja
    for "now", the watermarks and the table itself put in place of placeholders. Every other
    character of it is made inert for Jinja."""
    from audiences.dbt.models import _placeholder, escape_jinja, render_template

    conditions = state_conditions(definitions, keys)
    taken = json.dumps([definitions[k].raw for k in sorted(keys)], ensure_ascii=False, default=str)
    names = {
        name: _placeholder(f"state_{name}", taken)
        for name in ("now", "through", "after", "incremental", "previous", "events", "due")
    }
    context = CompileContext(
        attribute=lambda attribute: exp.column(attribute.column_name, quoted=True),
        audience_members=lambda key: exp.select("user_key").from_("members"),
        evaluation_time=exp.column(names["now"]),
        user_key=exp.column("user_key"),
        user_id=exp.column("user_id"),
        events=exp.to_table(names["events"]),
    )
    through = exp.column(names["through"])
    jinja = {
        names["now"]: "{{ now }}",
        names["through"]: "{{ through }}",
        names["previous"]: "{{ this }}",
        names["events"]: EVENTS_SOURCE,
        names["due"]: "{{ due }}",
    }
    for key in conditions:  # keys are hexadecimal digits
        jinja[f"{names['after']}_{key}"] = f"{{{{ markers.get('{key}', 0) }}}}"
        jinja[f"{names['incremental']}_{key}"] = f"{{{{ '{key}' in markers }}}}"

    def sql(text: str) -> str:
        text = escape_jinja(text)
        for name, value in sorted(jinja.items(), key=lambda item: -len(item[0])):
            text = text.replace(name, value)
        return _wrap(text)

    chosen = [condition for condition, _ in conditions.values()]
    incremental = event_state_sql(
        chosen,
        context,
        through,
        previous=exp.to_table(names["previous"]),
        markers=lambda key: (
            exp.column(f"{names['after']}_{key}"),
            exp.column(f"{names['incremental']}_{key}"),
        ),
        due=exp.column(names["due"]),
    )
    whole = event_state_sql(chosen, context, through)
    return render_template(
        "int_event_state.sql",
        header=header,
        about=[
            _comment(f"{key}: {condition.operator} {condition.argument!r} ({', '.join(audiences)})")
            for key, (condition, audiences) in conditions.items()
        ],
        incremental=sql(incremental),
        whole=sql(whole),
        keys=", ".join(f"'{key}'" for key in conditions),
        marker=EVENT_STATE_MARKER,
    )


def _wrap(text: str) -> str:
    """One long statement on lines: a line break before each top-level-looking clause keyword
    outside string literals, for reading (the SQL is unchanged)."""
    import re

    parts = re.split(r"('(?:[^']|'')*')", text)
    for index in range(0, len(parts), 2):
        parts[index] = re.sub(
            r" (?=(with|select|from|where|union all|group by|join|full outer join|"
            r"[a-z_]+ as \(select)\b)",
            "\n",
            parts[index],
        )
    return "".join(parts)


def event_reevaluate_model(
    definitions: dict[str, AudienceDefinition], keys: set[str], header: str, counted: bool
) -> str:
    """`int_event_users_to_reevaluate` for the per-user event audiences `keys`
    (templates/int_event_users_to_reevaluate.sql); `counted` when one of them (or an audience it
    reads) has an event condition without a state, whose users new events list. Event names
    enter only as SQL literals, made inert for Jinja."""
    from audiences.dbt.models import escape_jinja, render_template

    windows = windows_by_event(definitions, keys)
    moved = [
        {
            "about": _comment(", ".join(audiences)),
            "event": _comment(window.event),
            "name": escape_jinja(render(exp.Literal.string(window.event), pretty=False)),
            "minutes": f"{window.minutes:+d}",
            "shift": int(window.minutes),
        }
        for window, audiences in sorted(
            windows.items(), key=lambda item: (item[0].event, item[0].minutes)
        )
    ]
    return render_template(
        "int_event_users_to_reevaluate.sql",
        header=header,
        users=USERS_MODEL,
        state=EVENT_STATE_MODEL,
        event_users="{{ source('warehouse', 'event_users') }}",
        events_source=EVENTS_SOURCE,
        windows=moved,
        counted=counted,
    )


def _comment(text: str) -> str:
    import re

    return re.sub(r"[\x00-\x1f\x7f\x85\u2028\u2029{}]", " ", text)
