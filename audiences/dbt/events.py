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

from sqlglot import exp

from audiences.conditions.compiler import EventWindow, event_windows, render
from audiences.conditions.definitions import AudienceDefinition

EVENT_REEVALUATE_MODEL = "int_event_users_to_reevaluate"
EVENTS_SOURCE = "{{ source('warehouse', 'events') }}"
USERS_MODEL = "stg_warehouse__users"


def windows_by_event(
    definitions: dict[str, AudienceDefinition], keys: set[str]
) -> dict[EventWindow, list[str]]:
    """The event windows of these (per-user) audiences, with the audiences that have each."""
    found: dict[EventWindow, list[str]] = {}
    for key in sorted(keys):
        for window in event_windows(definitions[key].segments) or []:
            found.setdefault(window, []).append(key)
    return found


def event_reevaluate_model(
    definitions: dict[str, AudienceDefinition], keys: set[str], header: str
) -> str:
    """`int_event_users_to_reevaluate` for the per-user event audiences `keys`
    (templates/int_event_users_to_reevaluate.sql). Event names enter only as SQL literals, made
    inert for Jinja."""
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
        events_source=EVENTS_SOURCE,
        windows=moved,
    )


def _comment(text: str) -> str:
    import re

    return re.sub(r"[\x00-\x1f\x7f\x85\u2028\u2029{}]", " ", text)
