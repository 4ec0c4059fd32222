{#-
    "Now" for the run: the `evaluation_time` var (ISO 8601, UTC), which the engine always passes
    (`prepare_raw` refuses a run without it). Without it (`dbt show`, `dbt compile`), any model
    that reads "now" fails if it is run.
-#}
{% macro evaluation_time() -%}
    {%- set value = var('evaluation_time', none) -%}
    {%- if not value -%}
        cast(raise_error('the evaluation_time var is not set') as timestamp)
    {%- elif not modules.re.fullmatch('[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z', value) -%}
        {{ exceptions.raise_compiler_error("evaluation_time must be an ISO 8601 UTC time (2026-11-01T00:00:00Z), got " ~ value) }}
    {%- else -%}
        timestamp'{{ value[:-1] | replace("T", " ") }}'
    {%- endif -%}
{%- endmacro %}
