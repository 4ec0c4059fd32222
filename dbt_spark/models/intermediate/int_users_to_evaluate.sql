-- The users this build evaluates, with their typed columns: every user in a full build (a view),
-- only the users of int_users_to_reevaluate in an incremental one (a table of their rows, written
-- once: materialized `evaluated_users`, macros/incremental.sql). Every audience reads from here.

{{ config(materialized='evaluated_users') }}

{%- set plan = build_plan() %}
-- depends_on: {{ ref('int_users_to_reevaluate') }}

select flattened.*
from {{ ref('int_users_flattened') }} as flattened
{%- if not plan.full %}
where flattened.user_key in (select user_key from {{ ref('int_users_to_reevaluate') }})
{%- endif %}
