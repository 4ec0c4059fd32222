[# int_event_users_to_reevaluate: whom events re-evaluate (audiences/dbt/events.py). Each of
   `windows` has the audiences' keys (`about`), the event name as a comment and as a literal,
   and the window's minutes. #]
[[ header ]]
-- depends_on: {{ ref('[[ users ]]') }}
-- depends_on: {{ ref('[[ state ]]') }}
{# The users whose event conditions may have changed since the last build of audience_members:
   those whose verdict of an event condition with a state changed where "now" moved since
   ([[ state ]]'s `changed_at`: new events or a lapsed window that changed it; at this "now",
   the rows recomputed when time went back, or rewritten by events past the last build's; a run
   again at the same "now" lists no one the last build evaluated), and, for event conditions counted over events, those
   with events loaded since (by `event_seq`) and those with an event whose time, shifted by one
   of the windows below, lies where "now" moved since. int_users_to_reevaluate lists them as users
   in a time window. One row with no user carries `events_through`: the newest event this list
   covers, which audience_members records as where its next build starts. #}

{{ config(materialized='table') }}

{% set last_build = audience_members_state_relation() %}
{% set events_state = events_state_relation() %}
{% set events_through = newest_event_seq() %}

{% if last_build is none %}

{# audience_members has not been built: it evaluates every user #}
select cast(null as integer) as user_key, {{ events_through }} as events_through

{% else %}

{% set events_after = last_events_through(events_state) %}
{% set previous_now = latest_timestamp(last_build, 'evaluated_at') or 'null' %}
{% set current_now = evaluation_time_literal() %}

select users.user_key, {{ events_through }} as events_through
from {{ ref('[[ users ]]') }} as users
where users.user_id in (

    -- verdicts of event conditions with a state that changed since the last build: where "now"
    -- moved since, or at this "now" when time went back or by events the last build did not cover
    select numbers.user_id
    from {{ ref('[[ state ]]') }} as state
    join [[ event_users ]] as numbers on numbers.user_number = state.user_number
    where (state.changed_at > {{ previous_now }} and state.changed_at <= {{ current_now }})
        or (state.changed_at = {{ current_now }}
            and (coalesce({{ previous_now }} > {{ current_now }}, true)
                or state.events_through > {{ events_after }}))
[% if counted %]

    union all

    -- events loaded since the last build, for the event conditions counted over events
    select user_id
    from [[ events_source ]]
    where event_seq > {{ events_after }} and event_seq <= {{ events_through }}
[% endif %]
[% for window in windows %]

    union all

    -- [[ window.about ]]: events named [[ window.event ]] at now [[ window.minutes ]] minutes
    select user_id
    from [[ events_source ]]
    where event = [[ window.name ]]
        and "timestamp" between least({{ previous_now }}, {{ current_now }}) + to_minutes(cast([[ window.shift ]] as bigint))
            and greatest({{ previous_now }}, {{ current_now }}) + to_minutes(cast([[ window.shift ]] as bigint))
[% endfor %]

)

union all

select null, {{ events_through }}

{% endif %}
