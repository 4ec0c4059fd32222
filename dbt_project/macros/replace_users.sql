{#
    The incremental strategy of int_users_flattened: `delete+insert` on the user key, except that
    the rows of deleted users are not inserted. A build selects every changed user, deleted ones
    included, so the delete removes their old rows; the insert then leaves them out.

    Inserting them and deleting them again in a post-hook gives the same table, but DuckDB pays
    for it at commit: rows deleted in the transaction that wrote them make it rewrite what it had
    already written (4.8 s of a 14 s cold build at 1M users, measured in bench/analysis.md).
#}

{% macro get_incremental_replace_users_sql(arg_dict) -%}
    {%- set target = arg_dict["target_relation"] -%}
    {%- set source = arg_dict["temp_relation"] -%}
    {%- set key = adapter.quote(arg_dict["unique_key"]) -%}
    {%- set columns = get_quoted_csv(arg_dict["dest_columns"] | map(attribute="name")) -%}
    delete from {{ target }}
    where {{ key }} in (select {{ key }} from {{ source }});

    insert into {{ target }} ({{ columns }})
    select {{ columns }}
    from {{ source }}
    where not is_deleted
{%- endmacro %}
