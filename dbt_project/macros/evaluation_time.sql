{#
    "Now" for a run: the `evaluation_time` var (ISO 8601, set by the engine so results are
    reproducible), or the moment dbt started when it is run by hand.
#}
{% macro evaluation_time() -%}
    {%- set value = var('evaluation_time', none) or run_started_at.strftime('%Y-%m-%dT%H:%M:%S.%fZ') -%}
    {%- if not modules.re.fullmatch('[0-9T:.+Z -]+', value) -%}
        {{ exceptions.raise_compiler_error("evaluation_time must be an ISO 8601 timestamp, got " ~ value) }}
    {%- endif -%}
    cast('{{ value }}' as timestamptz)
{%- endmacro %}
