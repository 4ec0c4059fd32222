{% macro column_names(relation) -%}
    {#- The names of `relation`'s columns (none while parsing): int_users_flattened keeps the
        columns it has and extracts only those a definition newly reads. -#}
    {%- if not execute or relation is none -%}
        {{ return([]) }}
    {%- endif -%}
    {{ return(adapter.get_columns_in_relation(relation) | map(attribute='name') | list) }}
{%- endmacro %}
