-- A hand-written SQL audience: everyone at a company whose accounts pay 1,000 or more a month in
-- total. Any model in this folder is an audience keyed by its file name (lower-case letters,
-- digits and `_`), as long as it returns the membership contract: user_key, user_id, tenant
-- (see _custom_audiences.yml). `audiences generate` adds it to the catalog and to audience_members,
-- and definitions can refer to it with is_audience_member.

{{ config(materialized='view', tags=['audience']) }}

with users as (

    select * from {{ ref('stg_warehouse__users') }}
    where not is_deleted

),

company_revenue as (

    select
        properties ->> '$.company.name' as company_name,
        sum(try_cast(properties ->> '$.mrr' as double)) as company_mrr
    from users
    where properties ->> '$.company.name' is not null
    group by company_name

),

final as (

    select
        users.user_key,
        users.user_id,
        cast(null as varchar) as tenant
    from users
    inner join company_revenue
        on company_revenue.company_name = users.properties ->> '$.company.name'
    where company_revenue.company_mrr >= 1000

)

select * from final
