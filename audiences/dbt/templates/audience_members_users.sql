[# The users audience_members re-evaluates per user, as temporary tables every batch reads, and
   the list of batches. `columns` are the int_users_flattened columns the time-relative audiences
   read (`timed`); `events` when per-user audiences count events without a state, `states` when
   they have event conditions with one. #]
[[ header ]]

{% macro audience_members_users(changed_users, users_after) -%}

    {#- the users whose data changed since the last build, for every audience -#}
    create or replace temp table [[ reevaluated_users ]] as
    select users.*
    from {{ ref('[[ flattened ]]') }} as users
    {% if changed_users %}
    where users.user_key in (select user_key from {{ ref('[[ reevaluate ]]') }} where changed)
        {% if users_after %}and users.updated_at > {{ users_after }}{% endif %}
    {% else %}
    where false {#- nobody's data changed (a schedule tick) #}
    {% endif %};
[% if timed %]

    {#- the changed users and those only in a time window, for the audiences that compare a
        timestamp with "now", in the columns those read -#}
    create or replace temp table [[ reevaluated_in_time ]] as
    select
        [[ columns | join(",\n        ") ]]
    from [[ reevaluated_users ]]

    union all

    select
        [[ columns | join(",\n        ") ]]
    from {{ ref('[[ flattened ]]') }}
    where user_key in (select user_key from {{ ref('[[ reevaluate ]]') }} where not changed);
[% if states %]

    {#- those users' rows of int_event_state: event conditions with a state read their verdicts
        from it, never the events (selected by the users' numbers, as below; a verdict current
        at "now", as a literal the scans check, without its times) -#}
    {%- set state_now = evaluation_time_literal() %}
    create or replace temp table [[ event_state_to_reevaluate ]] as
    [[ state_of_users ]];
[% endif %]
[% if events %]

    {#- the events of those users: event conditions re-evaluated per user count only theirs, so
        the events are read once here rather than once per event condition. Selected by the
        users' numbers (integers), which the scan checks before reading the events' other
        columns: only those users' events are read in full -#}
    create or replace temp table [[ events_to_reevaluate ]] as
    [[ events_of_users ]];
[% endif %]
[% endif %]
{%- endmacro %}

{% macro audience_members_pairs(tenants_after, memberships_after, previous_now, current_now) -%}

    {#- the tables of the tenants' and memberships' timestamps the windows compare with "now"
        (audiences/dbt/tenants.py `pair_windows_sql`), brought up to date; those of other
        columns (definitions changed since) dropped -#}
    {%- set keep = [] -%}
[% for scope, spec in times.items() %]
    {%- set [[ scope ]]_times = this.incorporate(path={'identifier': this.identifier ~ '__[[ scope ]]_times_[[ spec ]]'}) -%}
    {%- do keep.append([[ scope ]]_times.identifier) -%}
[% endfor %]
    {{ audience_members_drop_times(keep) }}
[[ times_setup ]]

    {#- the (user, tenant) pairs the per-tenant audiences re-evaluate: those whose membership,
        tenant or user changed since the last build (deleted ones too, whose rows go), or whose
        tenant's or membership's timestamp lies where "now" moved over; the times are literals -#}
    create or replace temp table [[ pairs ]] as
    with memberships as (
        select
            users.user_key,
            memberships.tenant_id as tenant,
            memberships.updated_at,
            memberships.deleted_at is null as is_current
        from {{ source('warehouse', 'tenant_memberships') }} as memberships
        inner join {{ source('warehouse', 'users') }} as users on users.user_id = memberships.user_id
    )

    select user_key, tenant from memberships
    where updated_at > {{ memberships_after }}

    union

    {#- (a membership deleted before the last build has no rows) #}
    select user_key, tenant from memberships
    where is_current and tenant in (
        select tenant_id from {{ source('warehouse', 'tenants') }}
        where updated_at > {{ tenants_after }}

        union all

        -- tenants whose timestamp "now" moved over
        (
[[ tenants_in_time ]]
        )
    )

    union

    select user_key, tenant from memberships
    where is_current and user_key in (select user_key from {{ ref('[[ reevaluate ]]') }})

    union

    -- memberships whose timestamp "now" moved over
    select users.user_key, in_time.tenant
    from (
[[ memberships_in_time ]]
    ) as in_time
    inner join {{ source('warehouse', 'users') }} as users on users.user_id = in_time.user_id;

    {#- their rows (the user's attributes, the tenant's and membership's JSON), read once for every
        per-tenant audience -#}
    create or replace temp table [[ pair_rows ]] as
[[ pair_rows_sql ]]
{%- endmacro %}

{% macro audience_members_batches(per_user, idle) -%}
    {#- Each batch's SELECT (macros/generated/audience_members_batch_*.sql). -#}
    {{ return([
        [[ calls | join(",\n        ") ]]
    ]) }}
{%- endmacro %}
