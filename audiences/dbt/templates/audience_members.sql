[# audience_members: the table every audience's members are written into, batch by batch, by its
   post-hook (macros/audience_members.sql); its select only gives the table its columns. `meta`
   is JSON (valid Jinja too), `reads` the models the batches read. #]
[[ header ]]
-- The members of every audience at this evaluation: one row per (audience, user, tenant).
-- Integer user keys keep tens of millions of rows cheap to write; join stg_warehouse__users for ids.

{# Incremental. An audience that reads only the user's own properties (or other such audiences)
   is re-evaluated only for the users in int_users_to_reevaluate: those changed since the last
   build, and, if it compares a timestamp with "now", those whose timestamps lie where "now" moved
   since then. Its conditions are those of its model in models/audiences/, repeated over that
   subset. Custom and static audiences, audiences over them, and audiences whose SQL changed are
   evaluated whole. Skipped audiences (their definitions have errors) keep their rows as they
   were. How: macros/audience_members.sql.

   The audiences are evaluated in [[ batches ]] batch(es) of at most [[ batch_size ]], one
   statement each (macros/generated/audience_members_batch_*.sql), by the post-hook
   `audience_members_evaluate`: the select below only gives the table its columns. #}

{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        on_schema_change='fail',
        pre_hook="{{ audience_members_forget_reevaluated() }}",
        post_hook=[
            "{{ audience_members_evaluate() }}",
            "{{ audience_members_record_events() }}",
            "{{ audience_members_record_build() }}",
        ],
        meta=[[ meta ]],
    )
}}

[% for model in reads %]
-- depends_on: {{ ref('[[ model ]]') }}
[% endfor %]

select
    cast(null as varchar) as audience_key,
    cast(null as integer) as user_key,
    cast(null as varchar) as tenant
where false
