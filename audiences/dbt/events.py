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
    """`int_event_users_to_reevaluate` for the per-user event audiences `keys`. Event names enter
    only as SQL literals, made inert for Jinja."""
    from audiences.dbt.models import escape_jinja

    windows = windows_by_event(definitions, keys)
    moved = []
    for window, audiences in sorted(
        windows.items(), key=lambda item: (item[0].event, item[0].minutes)
    ):
        name = escape_jinja(render(exp.Literal.string(window.event), pretty=False))
        about = ", ".join(audiences)
        moved.append(
            f"""
    union all

    -- {_comment(about)}: events named {_comment(window.event)} at now {window.minutes:+d} minutes
    select user_id
    from {EVENTS_SOURCE}
    where event = {name}
        and "timestamp" between least({{{{ previous_now }}}}, {{{{ current_now }}}}) + to_minutes(cast({window.minutes} as bigint))
            and greatest({{{{ previous_now }}}}, {{{{ current_now }}}}) + to_minutes(cast({window.minutes} as bigint))"""
        )
    return f"""{header}
-- depends_on: {{{{ ref('{USERS_MODEL}') }}}}
-- The users whose event conditions may have changed since the last build of audience_members:
-- those with events loaded since (by `event_seq`), and those with an event whose time, shifted by
-- one of the windows below, lies where "now" moved since. int_users_to_reevaluate lists them as
-- users in a time window. One row with no user carries `events_through`: the newest event this
-- list covers, which audience_members records as where its next build starts.

{{{{ config(materialized='table') }}}}

{{% set last_build = audience_members_state_relation() %}}
{{% set events_state = events_state_relation() %}}
{{% set events_through = newest_event_seq() %}}

{{% if last_build is none %}}

-- audience_members has not been built: it evaluates every user
select cast(null as integer) as user_key, {{{{ events_through }}}} as events_through

{{% else %}}

{{% set events_after = last_events_through(events_state) %}}
{{% set previous_now = latest_timestamp(last_build, 'evaluated_at') or 'null' %}}
{{% set current_now = evaluation_time_literal() %}}

select users.user_key, {{{{ events_through }}}} as events_through
from {{{{ ref('{USERS_MODEL}') }}}} as users
where users.user_id in (

    -- events loaded since the last build
    select user_id
    from {EVENTS_SOURCE}
    where event_seq > {{{{ events_after }}}} and event_seq <= {{{{ events_through }}}}
{"".join(moved)}

)

union all

select null, {{{{ events_through }}}}

{{% endif %}}
"""


def _comment(text: str) -> str:
    import re

    return re.sub(r"[\x00-\x1f\x7f\x85\u2028\u2029{}]", " ", text)
