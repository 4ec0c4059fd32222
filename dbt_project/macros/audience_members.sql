{#
    How audience_members stays incremental.

    Most audiences read only the user's own properties. Such an audience's membership of a user can
    change only when that user's data changes, or when "now" moves over one of the user's timestamps
    that a time-relative condition compares with (int_users_to_reevaluate finds both). So a build:

    1. reads the last build's state (audience_members__state): its evaluation time, the users'
       watermark, its audiences, and a hash of the SQL of each one it re-evaluated per user;
    2. keeps per-user re-evaluation for the audiences whose hash is unchanged (`per_user`). An
       audience over other per-user audiences is per-user too: their conditions are inlined over
       the same users, and into its hash. Every other audience (custom and static ones, audiences
       over them, new or changed ones) is evaluated whole;
    3. before appending the new rows, deletes the rows it replaces: those of the audiences evaluated
       whole, those of the users whose data changed, and, in the audiences that compare a timestamp
       with "now" (`reevaluated_in_time`), those of the users in a time window that "now" moved over;
    4. after appending, records the new state, and logs what it re-evaluated in
       audience_members__reevaluated, where the membership diff (audiences/membership/changes.py)
       reads which rows may have changed, and empties it. `(audience, null)` means the audience
       was evaluated whole, `(null, user)` that the user was re-evaluated in every audience, and
       `(null, null)` that everything was.

    Per-tenant audiences (meta `reevaluated_per_pair`, audiences/dbt/tenants.py) are re-evaluated
    by (user, tenant) pairs the same way: while their SQL is unchanged, only the pairs whose user,
    tenant or membership changed since the last build (the state's `tenants_watermark` and
    `memberships_watermark`), or whose tenant's or membership's timestamp "now" moved over, in
    the temporary table pairs_to_reevaluate (`audience_members_pairs`, macros/generated/). Their
    rows are deleted first, and the log names `(audience, user)` for each user of those pairs.
    The timestamps "now" is compared with are read from typed tables kept beside this one
    (audience_members__tenant_times_<hash>, ..._membership_times_<hash>), rewritten per change.
    A per-tenant audience over other audiences is re-evaluated so too when it reads only per-user
    and such per-tenant audiences (inlined over the same pairs); else it is evaluated whole.

    Skipped audiences (meta `skipped`: their definitions have errors this time) are neither
    evaluated nor deleted: their rows stay as the last good evaluation left them. The state lists
    them without a hash, so once fixed they are evaluated whole (users changed meanwhile too).

    All of it runs in the model's transaction: a failed build changes nothing, and the next one
    starts from the same state. `dbt build --full-refresh` evaluates everything again.

    The evaluation itself is the post-hook `audience_members_evaluate`: one INSERT per batch of at
    most 100 audiences (macros/generated/, written by `audiences generate`), never one statement
    over every audience, whose planning grew with the square of their number (bench/analysis.md).
    The pre-hook decides which audiences are re-evaluated per user and keeps that decision in a
    temporary table, so the post-hooks, which run after the table exists, act on the same one.
#}

{% macro audience_members_state_relation() -%}
    {#- The last build's state table, or none before the first build (and while parsing). -#}
    {%- if not execute -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set members = graph.nodes.values() | selectattr('resource_type', 'equalto', 'model')
                      | selectattr('name', 'equalto', 'audience_members') | first -%}
    {{ return(adapter.get_relation(database=members.database, schema=members.schema,
                                   identifier='audience_members__state')) }}
{%- endmacro %}


{% macro audience_members_per_user() -%}
    {#- Keys of the audiences this build re-evaluates per user: unchanged since the last build. -#}
    {%- if not (execute and is_incremental()) -%}
        {{ return([]) }}
    {%- endif -%}
    {%- set state = audience_members_state_relation() -%}
    {%- if state is none -%}
        {{ return([]) }}
    {%- endif -%}
    {%- set current = model.config.meta.get('reevaluated_per_user', {}) -%}
    {#- Per-tenant audiences need the watermarks of tenants and memberships (a state written by
        older code has none: they are evaluated whole once). -#}
    {%- set by_pairs = model.config.meta.get('reevaluated_per_pair', []) -%}
    {%- set pairs_known = audience_members_pair_watermarks(state) is not none -%}
    {%- set last = run_query('select audience_key, audience_hash from ' ~ state ~ ' where audience_hash is not null') -%}
    {%- set keys = [] -%}
    {%- for row in last.rows -%}
        {%- if current.get(row[0]) == row[1] and (pairs_known or row[0] not in by_pairs) -%}
            {%- do keys.append(row[0]) -%}
        {%- endif -%}
    {%- endfor -%}
    {{ return(keys | sort) }}
{%- endmacro %}


{% macro audience_members_pair_watermarks(state) -%}
    {#- The last build's newest tenant and membership changes, as literals: [tenants, memberships],
        or none when the state does not record them. -#}
    {%- set columns = adapter.get_columns_in_relation(state) | map(attribute='name') | list -%}
    {%- if 'tenants_watermark' not in columns -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set tenants = latest_timestamp(state, 'tenants_watermark') -%}
    {%- set memberships = latest_timestamp(state, 'memberships_watermark') -%}
    {{ return(none if tenants is none or memberships is none else [tenants, memberships]) }}
{%- endmacro %}


{% macro audience_members_literals(keys) -%}
    {%- for key in keys -%}
        '{{ key | replace("'", "''") }}'{{ ", " if not loop.last }}
    {%- endfor -%}
{%- endmacro %}


{% macro audience_members_last_keys() -%}
    {#- Every audience of the last build (state rows; a null hash means it was evaluated whole). -#}
    {%- set state = audience_members_state_relation() if is_incremental() else none -%}
    {%- if state is none -%}
        {{ return([]) }}
    {%- endif -%}
    {%- set last = run_query('select audience_key from ' ~ state ~ ' where audience_key is not null') -%}
    {{ return(last.rows | map(attribute=0) | list) }}
{%- endmacro %}


{% macro audience_members_decided() -%}
    {#- The per-user audiences the pre-hook decided on (for the post-hooks). -#}
    {%- if not execute -%}
        {{ return([]) }}
    {%- endif -%}
    {%- set decided = run_query('select audience_key from audience_members__per_user') -%}
    {{ return(decided.rows | map(attribute=0) | sort) }}
{%- endmacro %}


{% macro audience_members_evaluate() -%}
    {#- Post-hook: evaluate every audience, one INSERT per batch. The users re-evaluated per user
        are selected once, into temporary tables that every batch reads. -#}
    {%- set per_user = audience_members_decided() -%}
    {%- set changed_users = count_where(ref('int_users_to_reevaluate'), 'changed') if per_user else 0 -%}
    {%- set users_after = latest_timestamp(ref('int_users_to_reevaluate'), 'users_after') if changed_users else none -%}
    {#- In a schedule tick, the per-user audiences that do not compare with "now" have nobody to
        re-evaluate: their branches select nothing, and DuckDB does not plan their conditions. -#}
    {%- set timed = model.config.meta.get('reevaluated_in_time', []) -%}
    {%- set idle = [] if changed_users else per_user | reject('in', timed) | list -%}
    {%- if per_user %}
    {{ audience_members_users(changed_users, users_after) }}
    {%- endif %}
    {%- for batch in audience_members_batches(per_user, idle) %}
    insert into {{ this }} (audience_key, user_key, tenant)
    {{ batch }};
    {%- endfor %}
    drop table if exists temp.users_to_reevaluate;
    drop table if exists temp.users_to_reevaluate_in_time;
    drop table if exists temp.events_to_reevaluate;
    drop table if exists temp.pair_rows_to_reevaluate;
    drop table if exists temp.tenant_times_after;
    drop table if exists temp.membership_times_after
{%- endmacro %}


{% macro audience_members_drop_times(keep) -%}
    {#- The tables of the tenants' and memberships' timestamps (audiences/dbt/tenants.py) other than
        those in `keep`: kept for columns the definitions no longer compare with "now". -#}
    {%- set found = run_query("select table_name from information_schema.tables where table_schema = '"
        ~ this.schema ~ "' and regexp_full_match(table_name, '" ~ this.identifier
        ~ "__(tenant|membership)_times_[0-9a-f]+')") -%}
    {%- for row in found.rows if row[0] not in keep %}
    drop table if exists {{ this.incorporate(path={'identifier': row[0]}) }};
    {%- endfor %}
{%- endmacro %}


{% macro audience_members_forget_reevaluated() -%}
    {#- Pre-hook: decide which audiences are re-evaluated per user (kept for the post-hooks), and
        delete the rows this build replaces (never a skipped audience's). -#}
    {%- set decided = audience_members_per_user() -%}
    create or replace temp table audience_members__per_user (audience_key varchar);
    {%- if decided %}
    insert into audience_members__per_user values
    {%- for key in decided %} ({{ audience_members_literals([key]) }}){{ "," if not loop.last }}{% endfor %};
    {%- endif %}
    {%- if is_incremental() -%}
        {%- set per_user = decided -%}
        {%- set current = model.config.meta.get('audiences', []) -%}
        {%- set skipped = model.config.meta.get('skipped', []) -%}
        {%- set last = audience_members_last_keys() -%}
        {%- set whole = (current | reject('in', per_user) | list)
                        + (last | reject('in', current) | reject('in', skipped) | list) -%}
        {%- if not per_user -%}
            delete from {{ this }}
            {%- if skipped %}
            where audience_key not in ({{ audience_members_literals(skipped) }})
            {%- endif -%}
        {%- else -%}
            {#- Separate deletes: each filter alone reaches the table scan, an OR of them would not. -#}
            {%- if whole | reject('in', last) | list -%}
            {#- An audience the last build did not list (new, or a state written by older code). -#}
            delete from {{ this }}
            where audience_key not in ({{ audience_members_literals(per_user + skipped) }});
            {%- elif whole -%}
            delete from {{ this }}
            where audience_key in ({{ audience_members_literals(whole) }});
            {%- endif %}
            {#- A changed user's rows, in every audience; a user only in a time window, in the
                audiences that compare with "now". One semi-join scans the table; the rest of the
                condition only sees the rows it keeps. -#}
            {%- set timed = model.config.meta.get('reevaluated_in_time', []) | select('in', per_user) | list %}
            delete from {{ this }}
            where user_key in (select user_key from {{ ref('int_users_to_reevaluate') }})
                {%- if skipped %}
                and audience_key not in ({{ audience_members_literals(skipped) }})
                {%- endif %}
                and (
                    user_key in (select user_key from {{ ref('int_users_to_reevaluate') }} where changed)
                    {%- if timed %}
                    or audience_key in ({{ audience_members_literals(timed) }})
                    {%- endif %}
                )
            {#- The pairs the per-tenant audiences re-evaluate (macros/generated/), and their rows. -#}
            {%- set by_pairs = model.config.meta.get('reevaluated_per_pair', []) | select('in', per_user) | list %}
            {%- if by_pairs -%}
            {%- set state = audience_members_state_relation() -%}
            {%- set watermarks = audience_members_pair_watermarks(state) -%}
            ;
            {{ audience_members_pairs(watermarks[0], watermarks[1],
                                      latest_timestamp(state, 'evaluated_at') or 'null',
                                      evaluation_time_literal()) }};
            delete from {{ this }} as members
            using pairs_to_reevaluate as pairs
            where members.audience_key in ({{ audience_members_literals(by_pairs) }})
                and members.user_key = pairs.user_key
                and members.tenant = pairs.tenant
            {%- endif -%}
        {%- endif -%}
    {%- endif -%}
{%- endmacro %}


{% macro audience_members_record_build() -%}
    {#- Post-hook: the new state, and what this build re-evaluated (for the membership diff). -#}
    {%- set per_user = audience_members_decided() -%}
    {%- set state = this.incorporate(path={'identifier': this.identifier ~ '__state'}) -%}
    {%- set reevaluated = this.incorporate(path={'identifier': this.identifier ~ '__reevaluated'}) -%}
    {%- set hashes = model.config.meta.get('reevaluated_per_user', {}) -%}
    create table if not exists {{ state }} (
        audience_key varchar,
        audience_hash varchar,
        evaluated_at timestamptz,
        users_watermark timestamptz
    );
    {#- Added after the first states were written: a state without them re-evaluates per-tenant
        audiences whole once. -#}
    alter table {{ state }} add column if not exists tenants_watermark timestamptz;
    alter table {{ state }} add column if not exists memberships_watermark timestamptz;
    delete from {{ state }};
    {#- The users' watermark: what int_users_to_reevaluate covered (or, when it listed nobody, the
        last build's), so changes loaded after it was built are re-evaluated next time; after an
        evaluation of everything, the newest change that int_users_flattened has extracted. Read
        before the state is replaced. -#}
    {%- if per_user %}
    {%- set users_watermark = "coalesce((select max(users_through) from " ~ ref('int_users_to_reevaluate') ~ "), "
        ~ (latest_timestamp(state, 'users_watermark') or 'null') ~ ")" %}
    {%- else %}
    {%- set users_watermark = users_covered(ref('int_users_flattened'), ref('stg_warehouse__users')) %}
    {%- endif %}
    {#- The newest tenant and membership changes this build saw (in its transaction, under the
        run lock: the pairs it listed read the same tables); the oldest time when there are none. -#}
    insert into {{ state }} (audience_key, audience_hash, evaluated_at, users_watermark,
                             tenants_watermark, memberships_watermark)
    select
        audiences.audience_key,
        audiences.audience_hash,
        {{ evaluation_time() }},
        {{ users_watermark }},
        (select coalesce(max(updated_at), timestamptz '0001-01-01 00:00:00+00')
         from {{ source('warehouse', 'tenants') }}),
        (select coalesce(max(updated_at), timestamptz '0001-01-01 00:00:00+00')
         from {{ source('warehouse', 'tenant_memberships') }})
    from (
        {%- for key in model.config.meta.get('audiences', []) | sort %}
        select {{ audience_members_literals([key]) }} as audience_key,
            {% if key in hashes %}'{{ hashes[key] }}'{% else %}null{% endif %} as audience_hash union all
        {%- endfor %}
        {#- Kept, not evaluated: no hash, so the build after their fix evaluates them whole. #}
        {%- for key in model.config.meta.get('skipped', []) | sort %}
        select {{ audience_members_literals([key]) }}, null union all
        {%- endfor %}
        select null as audience_key, null as audience_hash
    ) as audiences;
    create table if not exists {{ reevaluated }} (audience_key varchar, user_key integer);
    {% if per_user -%}
    {%- set by_pairs = model.config.meta.get('reevaluated_per_pair', []) | select('in', per_user) | list %}
    insert into {{ reevaluated }}
    select null, user_key from {{ ref('int_users_to_reevaluate') }}
    {%- for key in model.config.meta.get('audiences', []) if key not in per_user %}
    union all
    select {{ audience_members_literals([key]) }}, null
    {%- endfor %}
    {#- A per-tenant audience re-evaluated by pairs: the users of those pairs, in it. -#}
    {%- for key in by_pairs %}
    union all
    select distinct {{ audience_members_literals([key]) }}, user_key from pairs_to_reevaluate
    {%- endfor %};
    drop table if exists temp.pairs_to_reevaluate;
    {%- else -%}
    insert into {{ reevaluated }} values (null, null);
    {%- endif %}
{%- endmacro %}
