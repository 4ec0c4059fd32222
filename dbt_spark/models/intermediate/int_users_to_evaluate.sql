-- The users this build evaluates, with their typed columns, read by every audience: this build's
-- version of int_users_flattened (macros/incremental.sql), which an incremental build writes with
-- exactly those users' rows; a compacting build writes a new base, of which only the re-evaluated
-- users are evaluated. A view of one partition: nothing is copied.

{{ config(materialized='view') }}

{%- set plan = build_plan() %}
-- depends_on: {{ ref('int_users_to_reevaluate') }}

select flattened.*
from {{ versions_of(ref('int_users_flattened')) }} as flattened
where flattened.run_id = {{ run_id_literal(invocation_id) }}
{%- if plan.compacting %}
    and flattened.user_key in (select user_key from {{ ref('int_users_to_reevaluate') }})
{%- endif %}
