-- This evaluation's membership events: this build's rows of audience_members diffed against the
-- open memberships of the committed history (raw.membership_events), with the ids DuckDB gives the
-- same changes (audiences/membership/changes.py): the n-th entry of a user into an audience, or its
-- end, always gets the same id. An incremental build compares only the users it re-evaluated (the
-- members and the history of everyone else agree already: macros/incremental.sql). With them, the
-- build's completion marker (a `committed` row). The post-hooks publish them all in one step
-- (macros/membership.sql): that step commits the build; then the versions no committed state
-- reads any more are pruned.

{{ config(materialized='table', post_hook=["{{ publish_membership_changes() }}", "{{ prune_versions() }}"]) }}

{%- set plan = build_plan() %}
-- depends_on: {{ ref('int_users_to_reevaluate') }}

-- An incremental build's re-evaluated users are joined by broadcasting their keys, whatever their
-- size: a shuffled join would move the whole history, so that a warm build's shuffle would follow
-- the table instead of the changed users.
with history as (

    select /*+ BROADCAST(reevaluated) */ events.*
    from {{ source('raw', 'membership_events') }} as events
    {%- if not plan.full %}
    left semi join {{ ref('int_users_to_reevaluate') }} as reevaluated
        on events.user_key = reevaluated.user_key
    {%- endif %}
    where events.event_type in ('entered', 'exited')

),

evaluated as (

    -- this build's version of audience_members (not committed yet: the view does not show it)
    select /*+ BROADCAST(reevaluated) */ members.audience_key, members.user_key, members.user_id,
        members.tenant
    from {{ versions_of(ref('audience_members')) }} as members
    {%- if not plan.full %}
    left semi join {{ ref('int_users_to_reevaluate') }} as reevaluated
        on members.user_key = reevaluated.user_key
    {%- endif %}
    where members.run_id = {{ run_id_literal(invocation_id) }}

),

latest as (

    -- each membership's last event: an entry not yet followed by its exit is open
    select
        *,
        row_number() over (
            partition by audience_key, user_key, tenant
            order by entry_number desc, case event_type when 'exited' then 1 else 0 end desc
        ) as position
    from history

),

open_memberships as (

    select audience_key, user_key, user_id, tenant, entry_number
    from latest
    where position = 1 and event_type = 'entered'
        and audience_key in (select audience_key from {{ ref('audience_catalog') }})

),

entries_so_far as (

    select audience_key, user_key, tenant, count(*) as entries
    from history
    where event_type = 'entered'
    group by audience_key, user_key, tenant

),

changes as (

    select
        coalesce(evaluated.audience_key, open_memberships.audience_key) as audience_key,
        coalesce(evaluated.user_key, open_memberships.user_key) as user_key,
        coalesce(open_memberships.user_id, evaluated.user_id) as user_id,
        coalesce(evaluated.tenant, open_memberships.tenant) as tenant,
        case when open_memberships.user_key is null then 'entered' else 'exited' end as event_type,
        open_memberships.entry_number as open_entry
    from evaluated
    full outer join open_memberships
        on evaluated.audience_key = open_memberships.audience_key
        and evaluated.user_key = open_memberships.user_key
        and evaluated.tenant <=> open_memberships.tenant
    where evaluated.user_key is null or open_memberships.user_key is null

),

numbered as (

    select
        changes.audience_key,
        changes.user_key,
        changes.user_id,
        changes.tenant,
        changes.event_type,
        case
            when changes.event_type = 'exited' then changes.open_entry
            else 1 + coalesce(entries_so_far.entries, 0)
        end as entry_number
    from changes
    left join entries_so_far
        on changes.audience_key = entries_so_far.audience_key
        and changes.user_key = entries_so_far.user_key
        and changes.tenant <=> entries_so_far.tenant

),

evaluated_before as (

    select distinct audience_key
    from {{ source('raw', 'membership_events') }}
    where event_type = 'evaluated'

),

events as (

    select
        numbered.*,
        catalog.audience_version,
        numbered.audience_key not in (select audience_key from evaluated_before) as is_backfill
    from numbered
    inner join {{ ref('audience_catalog') }} as catalog
        on numbered.audience_key = catalog.audience_key

)

select
    substr(sha2(concat_ws(
        char(31), audience_key, user_id, coalesce(tenant, ''), event_type, cast(entry_number as string)
    ), 256), 1, 32) as event_id,
    audience_key,
    cast(user_key as int) as user_key,
    user_id,
    tenant,
    event_type,
    cast(entry_number as int) as entry_number,
    {{ evaluation_time() }} as evaluated_at,
    cast(audience_version as string) as audience_version,
    is_backfill,
    cast(null as timestamp) as users_through,
    cast(null as string) as models_hash,
    cast(null as string) as after_run,
    cast(null as int) as build_sequence
from events

union all

-- one marker per audience evaluated: a later run knows its first members were backfill
select
    substr(sha2(concat_ws(char(31), 'evaluated', audience_key, cast({{ evaluation_time() }} as string)), 256), 1, 32),
    audience_key,
    cast(null as int),
    cast(null as string),
    cast(null as string),
    'evaluated',
    cast(null as int),
    {{ evaluation_time() }},
    cast(audience_version as string),
    false,
    cast(null as timestamp),
    cast(null as string),
    cast(null as string),
    cast(null as int)
from {{ ref('audience_catalog') }}

union all

-- the build's completion marker: where the next build starts (macros/incremental.sql)
select
    substr(sha2(concat_ws(char(31), 'committed', cast({{ evaluation_time() }} as string), '{{ invocation_id }}'), 256), 1, 32),
    '',
    cast(null as int),
    cast(null as string),
    cast(null as string),
    'committed',
    cast(null as int),
    {{ evaluation_time() }},
    cast(null as string),
    false,
    users_through,
    models_hash,
    after_run,
    build_sequence
from {{ ref('int_build_plan') }}
