{#
    Where event audiences' incremental re-evaluation starts (models/intermediate/
    int_event_users_to_reevaluate.sql): the newest event (`event_seq`, in load order) that the last
    build of audience_members covered, kept in `audience_members__events_state` by its post-hook.
#}

{% macro events_state_relation() -%}
    {%- if not execute -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set members = graph.nodes.values() | selectattr('resource_type', 'equalto', 'model')
                      | selectattr('name', 'equalto', 'audience_members') | first -%}
    {{ return(adapter.get_relation(database=members.database, schema=members.schema,
                                   identifier='audience_members__events_state')) }}
{%- endmacro %}


{% macro newest_event_seq() -%}
    {#- The newest loaded event's `event_seq` as a literal (0 when none, or while parsing). -#}
    {%- if not execute -%}
        {{ return('0') }}
    {%- endif -%}
    {%- set result = run_query("select coalesce(max(event_seq), 0) from " ~ source('warehouse', 'events')) -%}
    {{ return(result.rows[0][0] | string) }}
{%- endmacro %}


{% macro last_events_through(events_state) -%}
    {#- The newest event the last build covered; before any record, none was (every event counts). -#}
    {%- if events_state is none -%}
        {{ return('0') }}
    {%- endif -%}
    {%- set result = run_query("select coalesce(max(events_through), 0) from " ~ events_state) -%}
    {{ return(result.rows[0][0] | string) }}
{%- endmacro %}


{% macro audience_members_record_events() -%}
    {#- Post-hook of audience_members: the newest event this build covered, what
        int_event_users_to_reevaluate listed up to (a build that evaluated an audience whole read
        at least those). Conservative when that list is older: its events are listed again. -#}
    {%- set state = this.incorporate(path={'identifier': this.identifier ~ '__events_state'}) -%}
    create table if not exists {{ state }} (events_through bigint);
    delete from {{ state }};
    insert into {{ state }} select max(events_through) from {{ ref('int_event_users_to_reevaluate') }}
{%- endmacro %}


{% macro event_state_columns(state, columns) -%}
    {#- Gives an int_event_state built by an older layout the `columns` (name, type pairs) added
        since, before the model's statement reads them from it: dbt's `append_new_columns` adds
        them only after that statement has run, which then fails to bind. A row kept without
        `holds` counts as changed when rewritten and is tested over its times when read. -#}
    {%- if not execute -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set present = adapter.get_columns_in_relation(state) | map(attribute='name')
                      | map('lower') | list -%}
    {%- for name, type in columns if name not in present -%}
        {%- do run_query("alter table " ~ state ~ " add column " ~ adapter.quote(name) ~ " " ~ type) -%}
    {%- endfor -%}
{%- endmacro %}


{% macro event_state_markers(state, now) -%}
    {#- int_event_state's marker rows kept at or before `now` (a literal): each event condition's
        key and the newest event its state covers. A condition kept at a later "now" is absent,
        so it is recomputed from every event. -#}
    {%- if not execute -%}
        {{ return({}) }}
    {%- endif -%}
    {%- set result = run_query("select state_key, events_through from " ~ state
                               ~ " where user_number = -1 and evaluated_at <= " ~ now) -%}
    {%- set markers = {} -%}
    {%- for row in result.rows -%}
        {%- do markers.update({row[0]: row[1] | string}) -%}
    {%- endfor -%}
    {{ return(markers) }}
{%- endmacro %}
