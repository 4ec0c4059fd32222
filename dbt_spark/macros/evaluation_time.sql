{#-
    A setting of the run: the var `name` when it is given (`--vars`, a hand-run `dbt run`),
    otherwise the environment variable `variable`, which the engine sets (`SparkRun.environment`).
    The engine passes no vars: dbt re-parses the whole project when its vars change, and re-parses
    each file that read an environment variable while parsing when that variable changes. Read
    only while executing (`execute`), a new value each run re-parses nothing.
-#}
{% macro run_setting(name, variable) -%}
    {%- set value = var(name, none) -%}
    {%- if not value and execute -%}
        {%- set value = env_var(variable, "") -%}
    {%- endif -%}
    {{- return(value or none) -}}
{%- endmacro %}


{#- The `evaluation_time` setting (ISO 8601, UTC): "now" for the run. -#}
{% macro evaluation_time_setting() -%}
    {{- return(run_setting("evaluation_time", "AUDIENCES_SPARK_EVALUATION_TIME")) -}}
{%- endmacro %}


{#- The `users_parquet` setting: a parquet file or folder of users to load into raw.users first. -#}
{% macro users_parquet_setting() -%}
    {{- return(run_setting("users_parquet", "AUDIENCES_SPARK_USERS_PARQUET")) -}}
{%- endmacro %}


{#-
    "Now" for the run: the `evaluation_time` setting (ISO 8601, UTC), which the engine always sets
    (`prepare_raw` refuses a run without it). Without it (`dbt show`, `dbt compile`), any model
    that reads "now" fails if it is run.
-#}
{% macro evaluation_time() -%}
    {%- set value = evaluation_time_setting() -%}
    {%- if not value -%}
        cast(raise_error('the evaluation_time var is not set') as timestamp)
    {%- elif not modules.re.fullmatch('[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z', value) -%}
        {{ exceptions.raise_compiler_error("evaluation_time must be an ISO 8601 UTC time (2026-11-01T00:00:00Z), got " ~ value) }}
    {%- else -%}
        timestamp'{{ value[:-1] | replace("T", " ") }}'
    {%- endif -%}
{%- endmacro %}
