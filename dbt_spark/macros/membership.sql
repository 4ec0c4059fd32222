{#-
    The membership history on an engine without multi-statement transactions.

    raw.membership_events is partitioned by the dbt run that published the rows. A run writes its
    events into a folder no table reads, then attaches that folder as one partition: a single
    metastore operation, so a run killed at any statement leaves the history with all of its
    events or none of them, and the next run diffs against the same history and mints the same
    events (their ids are deterministic). On Delta or Iceberg the same step is one MERGE.
-#}

{% macro spark_warehouse() -%}
    {{ return(env_var('AUDIENCES_SPARK_WAREHOUSE')) }}
{%- endmacro %}


{#- A filesystem path as a Spark string literal (backslashes and quotes escaped). -#}
{% macro path_literal(path) -%}
    '{{ path | replace("\\", "\\\\") | replace("'", "\\'") }}'
{%- endmacro %}


{#- A path as a backticked identifier (parquet.`path`). -#}
{% macro path_identifier(path) -%}
    `{{ path | replace("`", "``") }}`
{%- endmacro %}


{% macro prepare_raw() %}
    {% if execute %}
        {% if not evaluation_time_setting() %}
            {{ exceptions.raise_compiler_error("set the evaluation_time var (ISO 8601 UTC) for a run") }}
        {% endif %}
        {% do run_query("create database if not exists raw") %}
        {% set users = users_parquet_setting() %}
        {% if users %}
            {% do run_query("drop table if exists raw.users") %}
            {% do run_query("create table raw.users using parquet as select user_key, user_id, "
                ~ "cast(properties as string) as properties, updated_at, deleted_at from parquet."
                ~ path_identifier(users)) %}
        {% endif %}
        {% do run_query(
            "create table if not exists raw.membership_events ("
            ~ "event_id string, audience_key string, user_key int, user_id string, tenant string, "
            ~ "event_type string, entry_number int, evaluated_at timestamp, audience_version string, "
            ~ "is_backfill boolean, users_through timestamp, models_hash string, after_run string, "
            ~ "build_sequence int, run_id string) using parquet partitioned by (run_id) location "
            ~ path_literal(spark_warehouse() ~ "/membership_events")) %}
        {% do run_query(
            "create table if not exists raw.reevaluation_log (user_key int, "
            ~ "run_id string) using parquet partitioned by (run_id) location "
            ~ path_literal(spark_warehouse() ~ "/reevaluation_log")) %}
        {% set later = run_query("select count(*) from raw.membership_events where evaluated_at > "
            ~ evaluation_time()).columns[0].values()[0] %}
        {% if later %}
            {{ exceptions.raise_compiler_error("evaluation time " ~ evaluation_time_setting() ~ " is before the last recorded change; membership history only moves forward") }}
        {% endif %}
    {% endif %}
{% endmacro %}


{#- This run's rows of membership_changes, written to a folder of their own, then attached. -#}
{% macro publish_membership_changes() %}
    {% if execute %}
        {% set folder = spark_warehouse() ~ "/membership_events_published/run_id=" ~ invocation_id %}
        {{ log("membership events staging: " ~ folder, info=true) }}
        {% do run_query("insert overwrite directory " ~ path_literal(folder) ~ " using parquet "
            ~ "select event_id, audience_key, user_key, user_id, tenant, event_type, entry_number, "
            ~ "evaluated_at, audience_version, is_backfill, users_through, models_hash, after_run, "
            ~ "build_sequence from " ~ this) %}
        {{ log("membership events staged: " ~ folder, info=true) }}
        {% do run_query("alter table raw.membership_events add partition (run_id = '"
            ~ invocation_id ~ "') location " ~ path_literal(folder)) %}
        {{ log("membership events published: run " ~ invocation_id, info=true) }}
        {{ log("build committed: run " ~ invocation_id, info=true) }}
    {% endif %}
{% endmacro %}
