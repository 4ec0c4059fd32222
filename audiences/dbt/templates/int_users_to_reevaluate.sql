[# int_users_to_reevaluate: the users audience_members re-evaluates per user in this build.
   `windows` are the compiler's predicates of the time windows (Jinja of the two times in place);
   `events` when per-user audiences count events. #]
[[ header ]]
-- depends_on: {{ ref('[[ users ]]') }}
-- depends_on: {{ ref('[[ flattened ]]') }}
[% if events %]
-- depends_on: {{ ref('[[ event_reevaluate ]]') }}
[% endif %]
{# The users whose memberships audience_members re-evaluates in this build (see its comments):
   users whose data changed since its last build (deleted users too), and users with a timestamp
   in a window that "now" moved over since then, where a time-relative condition may have
   changed. #}

{{ config(materialized='table') }}

{% set last_build = audience_members_state_relation() %}

{% if last_build is none %}

{# audience_members has not been built: it evaluates every user #}
select cast(null as integer) as user_key, cast(null as boolean) as changed,
    cast(null as timestamptz) as users_after, cast(null as timestamptz) as users_through
where false

{% else %}

{# The last build's times, read as the model runs and written in as literals, so that the
   filters reach the table scans (macros/watermarks.sql). #}
{% set users_watermark = latest_timestamp(last_build, 'users_watermark') %}
{% set previous_now = latest_timestamp(last_build, 'evaluated_at') or 'null' %}
{% set current_now = evaluation_time_literal() %}
{% set users_through = users_covered(ref('[[ flattened ]]'), ref('[[ users ]]')) %}

{# One row per user: `changed` when the user's data changed (every audience re-evaluates them),
   otherwise the user is only in a time window (audiences that compare with "now" re-evaluate
   them). The changed users are those whose change lies after `users_after` and up to
   `users_through`. `users_through`: the newest user change this list covers, which
   audience_members records as its watermark: changes that int_users_flattened has extracted (a
   build without it must not re-evaluate users from their old attributes), and that were loaded
   before this list was made (a build of audience_members alone must not skip them). Later
   changes wait for the next build. #}
select
    user_key,
    bool_or(changed) as changed,
    {{ users_watermark or 'cast(null as timestamptz)' }} as users_after,
    {{ users_through }} as users_through
from (

    -- users loaded, changed or deleted since the last build
    select user_key, true as changed
    from {{ ref('[[ users ]]') }}
    where {% if users_watermark %}updated_at > {{ users_watermark }}{% else %}true{% endif %}
        and updated_at <= {{ users_through }}
[% if windows %]

    union all

    -- users for whom a time-relative condition may have changed as "now" moved
[% for window in windows %]
[% if not loop.first %]

    union all

[% endif %]
    select user_key, false as changed
    from {{ ref('[[ flattened ]]') }}
    where
[[ window ]]
[% endfor %]
[% else %]

    -- (no audience re-evaluated per user compares with "now")
[% endif %]
[% if events %]

    union all

    -- users with new events, or events in a window that "now" moved over ([[ event_reevaluate ]])
    select user_key, false as changed
    from {{ ref('[[ event_reevaluate ]]') }}
    where user_key is not null
[% endif %]

) as candidates
group by user_key

{% endif %}
