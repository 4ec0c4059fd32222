{#
    "Now" for a run. The engine writes the run's evaluation time into raw.evaluation_clock before
    it starts dbt, so every model of a run sees the same fixed time and dbt's partial parsing is
    never invalidated by a changing var. Running dbt by hand re-evaluates at the last engine time,
    unless `--vars '{"evaluation_time": "2026-11-01T00:00:00Z"}'` (ISO 8601) says otherwise.
#}
{% macro evaluation_time() -%}
    {%- set value = var('evaluation_time', none) -%}
    {%- if value -%}
        {%- if not modules.re.fullmatch('[0-9T:.+Z -]+', value) -%}
            {{ exceptions.raise_compiler_error("evaluation_time must be an ISO 8601 timestamp, got " ~ value) }}
        {%- endif -%}
        cast('{{ value }}' as timestamptz)
    {%- else -%}
        (select max(evaluated_at) from raw.evaluation_clock)
    {%- endif -%}
{%- endmacro %}


{#- "Now" as a literal, read from raw.evaluation_clock as the model runs (see macros/watermarks.sql). -#}
{% macro evaluation_time_literal() -%}
    {%- if var('evaluation_time', none) -%}
        {{ return(evaluation_time()) }}
    {%- endif -%}
    {{ return(latest_timestamp('raw.evaluation_clock', 'evaluated_at') or evaluation_time()) }}
{%- endmacro %}
