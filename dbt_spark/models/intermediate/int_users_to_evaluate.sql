-- The users this build evaluates, with their typed columns: every user in a full build, only the
-- users of int_users_to_reevaluate in an incremental one (macros/incremental.sql). Every audience
-- reads from here.

{{ config(materialized='view') }}

{%- set plan = build_plan() %}
-- depends_on: {{ ref('int_users_to_reevaluate') }}

select flattened.*
from {{ ref('int_users_flattened') }} as flattened
{%- if not plan.full %}
where flattened.user_key in (select user_key from {{ ref('int_users_to_reevaluate') }})
{%- endif %}
