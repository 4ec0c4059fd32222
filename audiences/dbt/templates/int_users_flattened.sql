[# int_users_flattened: one row per user, one typed column per property variant an audience reads.
   `columns`: per attribute its label, SQL over `property_values` and column name; `extraction`:
   the one JSON parse of every property read. A property a definition starts reading gets its
   columns in place from the pre-hook (audiences/dbt/flattened.py). #]
[[ header ]]
{# One row per user and one typed column per property variant that an audience reads, so
   evaluating audiences scans typed columns instead of parsing JSON. Incremental: only users
   changed since the last build are extracted again, and a property that a definition starts
   reading adds its own columns to every row in place (the pre-hook, macros/generated/), the
   others kept. #}

{{
    config(
        materialized='incremental',
        unique_key='user_key',
        incremental_strategy='replace_users',
        on_schema_change='sync_all_columns',
        pre_hook="{{ [[ added_columns_macro ]]() }}",
        post_hook="{{ record_users_covered() }}",
    )
}}

{% set newest = users_extracted(this) if is_incremental() else none %}
{% set incremental = newest is not none %}

with users as (

    {% if incremental and count_where(ref('[[ users ]]'), 'updated_at > ' ~ newest) <= [[ spread_rows ]] %}
    {# only users changed since the last build (the newest change it extracted, read as the
       model runs, see macros/watermarks.sql). The loader writes changed users at the end of
       raw.users, where a few of them fill one or two of DuckDB's row groups, and a scan gives a
       row group to one thread: grouping by the key (one row per user already) hands the rows to
       every thread, so their JSON is extracted in parallel. (More users span enough row groups;
       grouping them would only cost memory.) #}
    select
        user_key,
        any_value(user_id) as user_id,
        any_value(updated_at) as updated_at,
        any_value(is_deleted) as is_deleted,
        any_value(properties) as properties
    from {{ ref('[[ users ]]') }}
    where updated_at > {{ newest }}
    group by user_key
    {% else %}
    select * from {{ ref('[[ users ]]') }}
    {% if incremental %}
    where updated_at > {{ newest }}
    {% else %}
    {# a new table: deleted users have no row (an incremental build selects them, so that their
       old rows are replaced by none: macros/replace_users.sql) #}
    where not is_deleted
    {% endif %}
    {% endif %}

),

extracted as (

    select
        user_key,
        user_id,
        updated_at,
        is_deleted,
        -- one parse of each user's JSON for every property an audience reads
        [[ extraction ]] as property_values
    from users

),

final as (

    select
        user_key,
        user_id,
        updated_at,
        is_deleted[[ "," if columns else "" ]]
[% for column in columns %]
        -- [[ column.label ]]
        [[ column.sql ]] as [[ column.name ]][[ "," if not loop.last else "" ]]
[% endfor %]
    from extracted

)

select * from final
