{#-
    Incremental builds on an engine without multi-statement transactions.

    A build re-evaluates only the users that may have changed since the last *committed* build: the
    users loaded, changed or deleted since then (raw.users' updated_at), and the users with a
    timestamp that "now" moved over (int_users_to_reevaluate). The two tables a build keeps,
    int_users_flattened and audience_members, are `atomic_table`s: each build writes a table's new
    contents (the re-evaluated users' new rows and everyone else's old rows) into a folder of its
    own, then points the table at that folder: one metastore operation, so a reader sees the old
    table or the new one, never a mix.

    A build commits by attaching its events with its completion marker (a `committed` row of
    raw.membership_events: its evaluation time, the newest user change it covered, the hash of the
    generated models, the committed build before it) in one partition (macros/membership.sql).
    The users it re-evaluates are attached to raw.reevaluation_log before it replaces
    audience_members. A build killed at any statement therefore leaves a marker that says what
    was committed and a log of what an uncommitted build may have replaced; the next build
    re-evaluates, and diffs against the history, those users too, so the members and the history
    agree again and no event is minted twice or wrongly. The next build is full (every user
    evaluated, every membership compared) when there is no marker, when the generated models
    changed (their hash, `models_hash`), or when an uncommitted build after the last marker was
    full.
-#}

{#- A Spark timestamp literal from the text `date_format` wrote, or `null`. -#}
{% macro timestamp_literal(text) -%}
    {{- "null" if text is none else "timestamp'" ~ text ~ "'" -}}
{%- endmacro %}


{#- A run id (dbt's invocation id: letters, digits, dashes) as a Spark string literal. -#}
{% macro run_id_literal(run_id) -%}
    {%- if not modules.re.fullmatch('[0-9A-Za-z-]*', run_id) -%}
        {{ exceptions.raise_compiler_error("not a run id: " ~ run_id) }}
    {%- endif -%}
    '{{ run_id }}'
{%- endmacro %}


{#- The plan of this build, decided by int_build_plan's model from the last marker: the head of
    the chain of committed builds (each marker names the build before it, `after_run`). -#}
{% macro plan_build(models_hash) %}
    {% if not execute %}
        {{ return({"full": true, "reason": "", "after_run": "", "previous_now": none,
                   "users_after": none, "users_through": none}) }}
    {% endif %}
    {% set last = run_query(
        "select run_id, date_format(evaluated_at, 'yyyy-MM-dd HH:mm:ss.SSSSSS'), "
        ~ "date_format(users_through, 'yyyy-MM-dd HH:mm:ss.SSSSSS'), models_hash "
        ~ "from raw.membership_events where event_type = 'committed' and run_id not in ("
        ~ "select after_run from raw.membership_events where event_type = 'committed' "
        ~ "and after_run is not null) order by evaluated_at desc limit 1").rows %}
    {% set through = run_query(
        "select date_format(max(updated_at), 'yyyy-MM-dd HH:mm:ss.SSSSSS') from raw.users").rows[0][0] %}
    {% if not last %}
        {% set plan = {"full": true, "reason": "no committed build", "after_run": "",
                       "previous_now": none, "users_after": none} %}
    {% else %}
        {% set plan = {"full": false, "reason": "", "after_run": last[0][0],
                       "previous_now": last[0][1], "users_after": last[0][2]} %}
        {% if last[0][3] != models_hash %}
            {% do plan.update({"full": true, "reason": "the generated models changed"}) %}
        {% elif run_query("select count(*) from raw.reevaluation_log where after_run = "
                ~ run_id_literal(last[0][0]) ~ " and user_key is null").rows[0][0] %}
            {% do plan.update({"full": true, "reason": "an interrupted build was full"}) %}
        {% endif %}
    {% endif %}
    {% do plan.update({"users_through": through}) %}
    {{ return(plan) }}
{% endmacro %}


{#- This build's plan (int_build_plan's one row), for the models after it. While parsing, an
    incremental plan, so that every ref of either kind of build is seen. -#}
{% macro build_plan() %}
    {% set relation = ref('int_build_plan') %}
    {% if not execute %}
        {{ return({"full": false, "after_run": "", "previous_now": none, "users_after": none,
                   "users_through": none}) }}
    {% endif %}
    {% set row = run_query(
        "select full_build, after_run, date_format(previous_now, 'yyyy-MM-dd HH:mm:ss.SSSSSS'), "
        ~ "date_format(users_after, 'yyyy-MM-dd HH:mm:ss.SSSSSS'), "
        ~ "date_format(users_through, 'yyyy-MM-dd HH:mm:ss.SSSSSS') from "
        ~ relation).rows[0] %}
    {{ return({"full": row[0], "after_run": row[1], "previous_now": row[2], "users_after": row[3],
               "users_through": row[4]}) }}
{% endmacro %}


{#- A filter of raw.users' rows: the users loaded, changed or deleted since the last committed
    build, up to the change this build covers. -#}
{% macro changed_users_filter(plan) -%}
    {%- if plan.users_through is none -%}
        false
    {%- else -%}
        {%- if plan.users_after is not none -%}
        updated_at > {{ timestamp_literal(plan.users_after) }} and {% endif -%}
        updated_at <= {{ timestamp_literal(plan.users_through) }}
    {%- endif -%}
{%- endmacro %}


{#- Post-hook of int_users_to_reevaluate: its users (a full build: one row, a null user) in a
    partition of raw.reevaluation_log of their own, attached before audience_members changes. -#}
{% macro log_reevaluated_users() %}
    {% if execute %}
        {% set plan = build_plan() %}
        {% set folder = spark_warehouse() ~ "/reevaluation_log/run_id=" ~ invocation_id %}
        {% set users = "cast(null as int)" if plan.full else "user_key" %}
        {% do run_query("insert overwrite directory " ~ path_literal(folder) ~ " using parquet "
            ~ "select " ~ run_id_literal(plan.after_run) ~ " as after_run, " ~ users ~ " as user_key from "
            ~ (this if not plan.full else "(select 1) as one")) %}
        {% do run_query("alter table raw.reevaluation_log add partition (run_id = "
            ~ run_id_literal(invocation_id) ~ ") location " ~ path_literal(folder)) %}
        {{ log(("full build: every user evaluated" if plan.full else "incremental build: "
            ~ run_query("select count(*) from " ~ this).rows[0][0] ~ " users re-evaluated"), info=true) }}
    {% endif %}
{% endmacro %}


{#-
    The model's rows written into `folder` (a version of the build's own), then `target` made to
    read them: an existing table is pointed at the folder in one metastore operation when
    `repoint`; otherwise what exists is dropped and the table created on the folder.
-#}
{% macro write_version(target, existing, folder, sql, repoint) %}
    {% call statement('main') -%}
        insert overwrite directory {{ path_literal(folder) }} using parquet
        select * from (
        {{ sql }}
        ) as model_rows
    {%- endcall %}
    {% if repoint and existing is not none and existing.type == 'table' %}
        {% do run_query("alter table " ~ target ~ " set location " ~ path_literal(folder)) %}
    {% else %}
        {% if existing is not none %}
            {% do adapter.drop_relation(existing) %}
        {% endif %}
        {% do run_query("create table " ~ target ~ " using parquet location " ~ path_literal(folder)) %}
    {% endif %}
{% endmacro %}


{#-
    A table replaced in one metastore operation: the model's rows are written into a folder of
    this build's own (versions/<table>/<run>), then the table is pointed at it. A full build
    drops and creates the table instead (its columns may have changed); a build killed between
    the two leaves no marker, so the next build is full again.
-#}
{% materialization atomic_table, adapter='spark' %}
    {%- set target = this.incorporate(type='table') -%}
    {%- set existing = adapter.get_relation(database=this.database, schema=this.schema, identifier=this.identifier) -%}
    {%- set plan = build_plan() -%}
    {%- set folder = spark_warehouse() ~ "/versions/" ~ this.identifier ~ "/" ~ invocation_id -%}
    {{ run_hooks(pre_hooks) }}
    {% do write_version(target, existing, folder, sql, repoint=not plan.full) %}
    {{ log(this.identifier ~ " replaced: " ~ folder, info=true) }}
    {{ run_hooks(post_hooks) }}
    {{ return({'relations': [target]}) }}
{% endmaterialization %}


{#-
    The users a build evaluates (int_users_to_evaluate), read by every audience: in a full build a
    view of int_users_flattened (everyone: a copy would only add a write), in an incremental one a
    table of the re-evaluated users' rows, written once into a folder of the build's own
    (versions/<table>/<run>, as `atomic_table`'s), so that each audience reads those few rows
    instead of joining the whole of int_users_flattened with them again. Rebuilt by every build
    and read by no other, so a build killed here leaves nothing to undo.
-#}
{% materialization evaluated_users, adapter='spark' %}
    {%- set existing = adapter.get_relation(database=this.database, schema=this.schema, identifier=this.identifier) -%}
    {%- set plan = build_plan() -%}
    {%- set target = this.incorporate(type='view' if plan.full else 'table') -%}
    {%- set folder = spark_warehouse() ~ "/versions/" ~ this.identifier ~ "/" ~ invocation_id -%}
    {{ run_hooks(pre_hooks) }}
    {% if plan.full %}
        {% if existing is not none %}
            {% do adapter.drop_relation(existing) %}
        {% endif %}
        {% call statement('main') -%}
            create view {{ target }} as {{ sql }}
        {%- endcall %}
    {% else %}
        {% do write_version(target, existing, folder, sql, repoint=true) %}
    {% endif %}
    {{ run_hooks(post_hooks) }}
    {{ return({'relations': [target]}) }}
{% endmaterialization %}
