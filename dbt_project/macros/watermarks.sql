{#
    Incremental models select the users changed since their last build. Written as a comparison
    with a subquery, that filter is a join that DuckDB evaluates after reading every user, JSON
    properties included (about 5 s at 10M users, even when nothing changed). Read first, and
    written into the SQL as a literal, the watermark reaches the table scan, so unchanged users
    are skipped before their properties are read.
#}

{% macro latest_timestamp(relation, column) -%}
    {#- `max(column)` of `relation` as a timestamptz literal; none while parsing or when empty. -#}
    {%- if not execute -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set result = run_query(
        "select strftime(max(" ~ adapter.quote(column) ~ ") at time zone 'UTC', '%Y-%m-%d %H:%M:%S.%f') from " ~ relation
    ) -%}
    {%- set value = result.rows[0][0] -%}
    {{ return(none if value is none else "cast('" ~ value ~ "+00' as timestamptz)") }}
{%- endmacro %}


{% macro first_value_of(relation, column) -%}
    {#- Any one value of `column` in `relation` (none while parsing or when empty). -#}
    {%- if not execute -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set result = run_query("select " ~ adapter.quote(column) ~ " from " ~ relation ~ " limit 1") -%}
    {{ return(result.rows[0][0] if result.rows else none) }}
{%- endmacro %}


{% macro count_where(relation, condition) -%}
    {#- How many rows of `relation` meet `condition`, SQL that our generator writes (0 while parsing). -#}
    {%- if not execute -%}
        {{ return(0) }}
    {%- endif -%}
    {%- set result = run_query("select count(*) from " ~ relation ~ " where " ~ condition) -%}
    {{ return(result.rows[0][0]) }}
{%- endmacro %}


{% macro record_users_covered() -%}
    {#- Post-hook of int_users_flattened: the newest user change it has extracted, in
        `<this>__covered` (every change in the warehouse when it was built). -#}
    {%- set covered = this.incorporate(path={'identifier': this.identifier ~ '__covered'}) %}
    create table if not exists {{ covered }} (users_through timestamptz);
    delete from {{ covered }};
    insert into {{ covered }} select max(updated_at) from {{ ref('stg_warehouse__users') }}
{%- endmacro %}


{% macro covered_relation(flattened) -%}
    {#- int_users_flattened's `__covered` table (none before its first build with this record). -#}
    {{ return(adapter.get_relation(database=flattened.database, schema=flattened.schema,
                                   identifier=flattened.identifier ~ '__covered') if execute else none) }}
{%- endmacro %}


{% macro users_extracted(flattened) -%}
    {#- Where int_users_flattened's next build starts: the newest change its last build extracted
        (a one-row read; deleted users, which it leaves out, are not selected again), or its newest
        row before there was a record. -#}
    {%- set covered = covered_relation(flattened) -%}
    {{ return(latest_timestamp(covered, 'users_through') if covered is not none
              else latest_timestamp(flattened, 'updated_at')) }}
{%- endmacro %}


{% macro users_covered(flattened, users) -%}
    {#- The newest user change that both the warehouse and int_users_flattened have, as a literal:
        what int_users_to_reevaluate can list (macros/audience_members.sql). -#}
    {%- set newest = latest_timestamp(users, 'updated_at') -%}
    {%- set covered = covered_relation(flattened) -%}
    {%- set extracted = latest_timestamp(covered, 'users_through') if covered is not none else newest -%}
    {%- if newest is none or extracted is none -%}
        {{ return('cast(null as timestamptz)') }}
    {%- endif -%}
    {{ return('least(' ~ newest ~ ', ' ~ extracted ~ ')') }}
{%- endmacro %}
