{#-
    Incremental builds on plain Parquet, without transactions: a build writes in proportion to
    the users it re-evaluates, and commits with one metastore operation.

    A build re-evaluates only the users that may have changed since the last *committed* build:
    the users loaded, changed or deleted since then (raw.users' updated_at), and the users with a
    timestamp that "now" moved over (int_users_to_reevaluate). It logs them in
    raw.reevaluation_log, a partition of its own (`run_id`): these are its tombstones.

    The two tables a build keeps, int_users_flattened and audience_members, are `versioned_table`s.
    Each build writes one *version* of each, a folder of its own attached as a partition of
    `<table>__versions`: in an incremental build a *delta*, the re-evaluated users' new rows only
    (a user deleted, or out of every audience, has none); in a full build, or when the deltas since
    the last base have grown past a threshold (a compacting build, `compact_after_*` vars), a new
    *base*, every row (its log is one row with a null user: every earlier row is replaced).

    The table itself is a view of its committed state: the rows of the committed builds' versions
    since the last base, each kept unless a later committed build re-evaluated its user. A build
    is committed by its completion marker, a `committed` row of raw.membership_events attached
    with its events in one partition (macros/membership.sql); the marker gives the build its place
    in the chain (`build_sequence`). So until that one operation every partition a build attached
    is invisible, and after it all are: a build killed at any statement leaves the old members and
    the old history, never a mix, and the next build starts again from the same marker. After a
    commit the versions and logs that no committed state reads any more (before the last base, or
    of builds that never committed) are dropped (`prune_versions`).

    A build is full (every user evaluated, every membership compared) when there is no marker, or
    when the generated models changed (their hash, `models_hash`).
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


{#- The committed builds (run_id, build_sequence) and, per build, the users it replaced
    (`replaced`: user_key, build_sequence; a null user_key replaced every row). -#}
{% macro committed_builds_sql() -%}
    builds as (
        -- the committed builds: those with a completion marker in the history
        select run_id, build_sequence
        from raw.membership_events
        where event_type = 'committed'
    ),

    replaced as (
        -- the users each committed build re-evaluated (a null user: every user, a base)
        select logged.user_key, builds.build_sequence
        from raw.reevaluation_log as logged
        inner join builds on logged.run_id = builds.run_id
    ),

    base as (
        select max(build_sequence) as build_sequence from replaced where user_key is null
    )
{%- endmacro %}


{#- The plan of this build, decided by int_build_plan's model from the last marker: the head of
    the chain of committed builds (each marker names the build before it, `after_run`), and
    whether this build writes bases (full, or the deltas since the last base passed a
    `compact_after_*` threshold). -#}
{% macro plan_build(models_hash) %}
    {% if not execute %}
        {{ return({"full": true, "writes_base": true, "reason": "", "after_run": "",
                   "build_sequence": 1, "previous_now": none, "users_after": none,
                   "users_through": none}) }}
    {% endif %}
    {% set last = run_query(
        "select run_id, date_format(evaluated_at, 'yyyy-MM-dd HH:mm:ss.SSSSSS'), "
        ~ "date_format(users_through, 'yyyy-MM-dd HH:mm:ss.SSSSSS'), models_hash, build_sequence "
        ~ "from raw.membership_events where event_type = 'committed' and run_id not in ("
        ~ "select after_run from raw.membership_events where event_type = 'committed' "
        ~ "and after_run is not null) order by evaluated_at desc limit 1").rows %}
    {% set users = run_query(
        "select date_format(max(updated_at), 'yyyy-MM-dd HH:mm:ss.SSSSSS'), count(*) "
        ~ "from raw.users").rows[0] %}
    {% if not last %}
        {% set plan = {"full": true, "reason": "no committed build", "after_run": "",
                       "build_sequence": 1, "previous_now": none, "users_after": none} %}
    {% else %}
        {% set plan = {"full": false, "reason": "", "after_run": last[0][0],
                       "build_sequence": (last[0][4] | int) + 1, "previous_now": last[0][1],
                       "users_after": last[0][2]} %}
        {% if last[0][3] != models_hash %}
            {% do plan.update({"full": true, "reason": "the generated models changed"}) %}
        {% endif %}
    {% endif %}
    {% do plan.update({"users_through": users[0], "writes_base": plan.full}) %}
    {% if not plan.full %}
        {#- The deltas since the last base: how many builds, how many users they replaced. -#}
        {% set deltas = run_query(
            "with " ~ committed_builds_sql() ~ " select "
            ~ "(select count(*) from builds where build_sequence > (select build_sequence from base)), "
            ~ "(select count(*) from replaced where build_sequence > (select build_sequence from base))"
            ).rows[0] %}
        {% if deltas[0] | int >= var('compact_after_builds') | int %}
            {% do plan.update({"writes_base": true, "reason": deltas[0] ~ " deltas since the last base"}) %}
        {% elif deltas[1] | int > (var('compact_after_share') | float) * (users[1] | int) %}
            {% do plan.update({"writes_base": true, "reason": deltas[1]
                ~ " users replaced by the deltas since the last base, of " ~ users[1]}) %}
        {% endif %}
    {% endif %}
    {{ return(plan) }}
{% endmacro %}


{#- This build's plan (int_build_plan's one row), for the models after it. While parsing, an
    incremental plan, so that every ref of either kind of build is seen. -#}
{% macro build_plan() %}
    {% set relation = ref('int_build_plan') %}
    {% if not execute %}
        {{ return({"full": false, "writes_base": false, "compacting": false, "after_run": "",
                   "build_sequence": 1, "previous_now": none, "users_after": none,
                   "users_through": none}) }}
    {% endif %}
    {% set row = run_query(
        "select full_build, writes_base, build_sequence, after_run, "
        ~ "date_format(previous_now, 'yyyy-MM-dd HH:mm:ss.SSSSSS'), "
        ~ "date_format(users_after, 'yyyy-MM-dd HH:mm:ss.SSSSSS'), "
        ~ "date_format(users_through, 'yyyy-MM-dd HH:mm:ss.SSSSSS') from "
        ~ relation).rows[0] %}
    {{ return({"full": row[0], "writes_base": row[1], "compacting": row[1] and not row[0],
               "build_sequence": row[2], "after_run": row[3], "previous_now": row[4],
               "users_after": row[5], "users_through": row[6]}) }}
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


{#- The committed state of a versioned table (its view), read without `ref`: the last committed
    build's, not this build's, so no dependency on the model that writes this build's version. -#}
{% macro committed_state(model_name) -%}
    {{ return(this.incorporate(path={"identifier": model_name}, type='view')) }}
{%- endmacro %}


{#- The partitioned table that holds a versioned table's versions. -#}
{% macro versions_of(relation) -%}
    {{ return(relation.incorporate(path={"identifier": relation.identifier ~ "__versions"}, type='table')) }}
{%- endmacro %}


{#- Post-hook of int_users_to_reevaluate: its users, this build's tombstones, in a partition of
    raw.reevaluation_log of their own (a build that writes bases: one row, a null user). -#}
{% macro log_reevaluated_users() %}
    {% if execute %}
        {% set plan = build_plan() %}
        {% set folder = spark_warehouse() ~ "/reevaluation_log/run_id=" ~ invocation_id %}
        {% set users = "cast(null as int)" if plan.writes_base else "user_key" %}
        {% do run_query("insert overwrite directory " ~ path_literal(folder) ~ " using parquet "
            ~ "select " ~ users ~ " as user_key from "
            ~ (this if not plan.writes_base else "(select 1) as one")) %}
        {% do run_query("alter table raw.reevaluation_log add partition (run_id = "
            ~ run_id_literal(invocation_id) ~ ") location " ~ path_literal(folder)) %}
        {{ log(("full build: every user evaluated" if plan.full else "incremental build: "
            ~ run_query("select count(*) from " ~ this).rows[0][0] ~ " users re-evaluated"
            ~ ("; writes new bases (compaction)" if plan.writes_base else "")), info=true) }}
    {% endif %}
{% endmacro %}


{#-
    A table kept between builds as versions (above): this build's rows (the model's SQL: a delta
    or a base) are written into a folder of the build's own (versions/<table>/run_id=<run>) and
    attached as a partition of `<table>__versions`, invisible until the build commits. The model's
    relation is a view of the committed state. A full build whose columns changed starts a new
    `__versions` table (the old one's partitions are then unread; the next build is full again
    until this one commits).
-#}
{% materialization versioned_table, adapter='spark' %}
    {%- set view = this.incorporate(type='view') -%}
    {%- set existing = adapter.get_relation(database=this.database, schema=this.schema, identifier=this.identifier) -%}
    {%- set versions = versions_of(this) -%}
    {%- set root = spark_warehouse() ~ "/versions/" ~ this.identifier -%}
    {%- set folder = root ~ "/run_id=" ~ invocation_id -%}
    {{ run_hooks(pre_hooks) }}
    {% call statement('main') -%}
        insert overwrite directory {{ path_literal(folder) }} using parquet
        select * from (
        {{ sql }}
        ) as model_rows
    {%- endcall %}
    {% set columns = run_query("describe query select * from (\n" ~ sql ~ "\n) as model_rows") %}
    {% set names = [] %}
    {% set definitions = [] %}
    {% for row in columns.rows %}
        {% do names.append(adapter.quote(row[0])) %}
        {% do definitions.append(adapter.quote(row[0]) ~ " " ~ row[1]) %}
    {% endfor %}
    {% set table = adapter.get_relation(database=versions.database, schema=versions.schema, identifier=versions.identifier) %}
    {% if table is not none %}
        {% set kept = run_query("describe query select * from " ~ versions) %}
        {% set kept_definitions = [] %}
        {% for row in kept.rows if row[0] != 'run_id' %}
            {% do kept_definitions.append(adapter.quote(row[0]) ~ " " ~ row[1]) %}
        {% endfor %}
        {% if kept_definitions != definitions %}
            {% do adapter.drop_relation(table) %}
            {% set table = none %}
        {% endif %}
    {% endif %}
    {% if table is none %}
        {% do run_query("create table " ~ versions ~ " (" ~ definitions | join(", ")
            ~ ", run_id string) using parquet partitioned by (run_id) location " ~ path_literal(root)) %}
    {% endif %}
    {% do run_query("alter table " ~ versions ~ " add partition (run_id = "
        ~ run_id_literal(invocation_id) ~ ") location " ~ path_literal(folder)) %}
    {{ log(this.identifier ~ " version written: " ~ folder, info=true) }}
    {% if existing is not none and existing.type != 'view' %}
        {% do adapter.drop_relation(existing) %}
    {% endif %}
    {% call statement('committed_view') -%}
        create or replace view {{ view }} as
        -- {{ this.identifier }} as the committed builds left it: the rows of their versions since
        -- the last base, each kept unless a later committed build re-evaluated its user
        -- (macros/incremental.sql)
        with {{ committed_builds_sql() }},

        versions as (
            select version_rows.*, builds.build_sequence as version_sequence
            from {{ versions }} as version_rows
            inner join builds on version_rows.run_id = builds.run_id
            where builds.build_sequence >= (select build_sequence from base)
        )

        select {{ names | join(", ") }}
        from versions
        left anti join replaced
            on versions.user_key = replaced.user_key
            and replaced.build_sequence > versions.version_sequence
    {%- endcall %}
    {{ run_hooks(post_hooks) }}
    {{ return({'relations': [view]}) }}
{% endmaterialization %}


{#- After a commit: the partitions no committed state reads any more dropped from every
    versioned table and from raw.reevaluation_log: those of committed builds before the last base
    (superseded), and those of builds that never committed (interrupted). Their folders are
    listed in the log for the caller to remove (local warehouses; a cluster's storage has its own
    lifecycle rules). -#}
{% macro prune_versions() %}
    {% if execute %}
        {% set committed = {} %}
        {% for row in run_query("with " ~ committed_builds_sql()
                ~ " select run_id, build_sequence >= (select build_sequence from base) from builds").rows %}
            {% do committed.update({row[0]: row[1]}) %}
        {% endfor %}
        {% set tables = ["raw.reevaluation_log"] %}
        {% for node in graph.nodes.values() if node.resource_type == 'model'
                and node.config.materialized == 'versioned_table' %}
            {% do tables.append(versions_of(api.Relation.create(
                database=node.database, schema=node.schema, identifier=node.alias))) %}
        {% endfor %}
        {% set superseded, uncommitted = [], [] %}
        {% for table in tables %}
            {% for row in run_query("show partitions " ~ table).rows %}
                {% set run = row[0].split("=", 1)[1] %}
                {% if not committed.get(run, false) %}
                    {% do run_query("alter table " ~ table ~ " drop if exists partition (run_id = "
                        ~ run_id_literal(run) ~ ")") %}
                    {% set found = uncommitted if run not in committed else superseded %}
                    {% if run not in found %}
                        {% do found.append(run) %}
                    {% endif %}
                {% endif %}
            {% endfor %}
        {% endfor %}
        {{ log("superseded builds pruned: " ~ superseded | sort | join(" "), info=true) }}
        {{ log("uncommitted builds pruned: " ~ uncommitted | sort | join(" "), info=true) }}
    {% endif %}
{% endmacro %}
