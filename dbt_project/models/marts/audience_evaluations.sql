-- One row per audience per evaluation: when "now" was, how many members, which definition.
-- Appended on every run, so member counts over time are a query away.

{{
    config(
        materialized='incremental',
        unique_key=['evaluated_at', 'audience_key'],
        incremental_strategy='delete+insert',
    )
}}

with catalog as (

    select * from {{ ref('audience_catalog') }}
    -- a skipped audience (its definition has errors) was not evaluated
    where not is_skipped

),

members as (

    select * from {{ ref('audience_members') }}

),

member_counts as (

    select
        audience_key,
        count(*) as member_count
    from members
    group by audience_key

),

final as (

    select
        {{ evaluation_time() }} as evaluated_at,
        catalog.audience_key,
        catalog.audience_type,
        catalog.audience_version,
        coalesce(member_counts.member_count, 0) as member_count,
        '{{ invocation_id }}' as dbt_invocation_id
    from catalog
    left join member_counts
        on catalog.audience_key = member_counts.audience_key

)

select * from final
