{#
    Audience models live in a schema named `audiences` (not `main_audiences`), so analysts can
    write `select * from audiences.power_users`.
#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {{ custom_schema_name | trim if custom_schema_name else target.schema }}
{%- endmacro %}
