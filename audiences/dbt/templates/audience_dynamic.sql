[# A dynamic audience's model: the users of int_users_flattened that its conditions hold for.
   Rendered by audiences/dbt/models.py with `[[ ]]` and `[% %]`; `{{ }}` and `{% %}` are dbt's.
   `where` is the condition compiler's SQL, every value a literal, made inert for Jinja;
   `per_tenant`, for an audience evaluated per (user, tenant) pair, the body over its pairs. #]
[[ header ]]
-- Audience `[[ key ]]` (dynamic[[ tenancy ]], version [[ version ]]): [[ name ]]
[% if description %]
-- [[ description ]]
[% endif %]

{{ config(materialized='view', tags=['audience']) }}

[% if per_tenant %]
[[ per_tenant ]]
[% else %]
select
    user_key,
    user_id,
    cast(null as varchar) as tenant
from {{ ref('[[ flattened ]]') }}
where
[[ where ]]
[% endif %]
