"""Per-tenant audiences in dbt: an audience with `"tenancy": "per_tenant"` is evaluated once per
(user, tenant) pair the user belongs to.

The pairs are the tenant memberships whose user and tenant both exist: each row has the user's
typed columns (`int_users_flattened`, which `recipient.*` reads), the tenant's id (`tenant`) and
the JSON of the tenant and of the membership (`tenant_properties`, `membership_properties`, which
`tenant.*` and `membership.*` read through `compiler.pair_attribute`: the same typed views, so the
same operators and rules). Members are `(user_key, user_id, tenant)` rows, the contract every
audience model keeps.

`audience_members` re-evaluates such an audience by pairs (macros/audience_members.sql): only the
pairs whose user, tenant or membership changed since its last build, or whose tenant's or
membership's timestamp lies where "now" moved over (`pair_windows_sql`), listed in the temporary
table `PAIRS_TO_REEVALUATE`, whose rows (the user's attributes, the tenant's and membership's
JSON) are read once into `PAIR_ROWS`, which every such audience's conditions then read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from sqlglot import exp

from audiences.conditions.compiler import TimeWindow, pair_attribute, render

TENANTS_MODEL = "stg_warehouse__tenants"
MEMBERSHIPS_MODEL = "stg_warehouse__tenant_memberships"
# audience_members' temporary tables: the (user_key, tenant) pairs it re-evaluates in a build, and
# their rows as `pairs_sql` gives them.
PAIRS_TO_REEVALUATE = "pairs_to_reevaluate"
PAIR_ROWS = "pair_rows_to_reevaluate"


def pairs_sql(users: str, memberships: str, tenants: str, only: str | None = None) -> str:
    """The (user, tenant) pairs over these relations (SQL of our own, no user text): every column
    of `users`, then `tenant`, `tenant_properties` and `membership_properties`; only those listed
    in the relation `only` (`user_key`, `tenant`), if given."""
    sql = f"""select
    users.*,
    memberships.tenant_id as tenant,
    tenants.properties as tenant_properties,
    memberships.properties as membership_properties
from {users} as users
inner join {memberships} as memberships on memberships.user_id = users.user_id
inner join {tenants} as tenants on tenants.tenant_id = memberships.tenant_id"""
    if only is not None:
        sql += (
            f"\ninner join {only} as reevaluated\n"
            "    on reevaluated.user_key = users.user_key and reevaluated.tenant = memberships.tenant_id"
        )
    return sql


# Per scope of a pair's timestamps: the loader's table, its key, and the columns a row keeps
# beside its typed timestamps (those the pairs macro selects: `tenant`, and a membership's
# `user_id`). The JSON column is named as `compiler.pair_attribute` reads it.
_TIMES_SOURCES = {
    "tenant": (
        "tenants",
        "tenant_key",
        "tenant_id as tenant, properties as tenant_properties",
    ),
    "membership": (
        "tenant_memberships",
        "membership_key",
        "user_id, tenant_id as tenant, properties as membership_properties",
    ),
}
# audience_members' tables of those timestamps: `audience_members__<scope>_times_<spec>`.
TIMES_TABLE = "{members}__{scope}_times_{spec}"


def pair_windows_sql(
    windows: Iterable[TimeWindow], previous: str, current: str, escape: Callable[[str], str]
) -> tuple[str, str, str]:
    """What the pairs macro needs of the pairs "now" moved over, given placeholders for the two
    times (replaced by the Jinja `previous_now` and `current_now`) and `escape` (makes user text
    inert for Jinja): SQL that brings each scope's table of timestamps up to date, and two
    selects: the tenants (`tenant`) whose timestamp lies in a window of scope `tenant`, and the
    memberships (`user_id`, `tenant`) whose timestamp lies in one of scope `membership` (each
    `where false` without such windows).

    As the users' timestamps are (`int_users_flattened`), the tenants' and memberships' ones that
    a window compares with "now" are extracted from their JSON once per change, as the audience
    reads them (`compiler.pair_attribute`), into one typed column each of a table kept beside
    `audience_members` (`TIMES_TABLE`, in the Jinja variable `<scope>_times`): each build
    rewrites the rows of the tenants or memberships changed since the newest change that table
    holds (a deletion is a change; its row stays, not current; `extracted_at` tells when a row
    was written). So a build reads a few typed
    columns, one select per window (a comparison of one column reaches the scan), not every
    tenant's JSON. The table's name carries a hash of its columns: a definition that starts or
    stops comparing a timestamp gets a new table, filled whole; the pairs macro drops the old
    (`audience_members_drop_times`)."""
    previous_sql, current_sql = exp.column(previous), exp.column(current)
    chosen = {
        scope: sorted(
            {w.attribute for w in windows if w.attribute.scope == scope},
            key=lambda a: a.column_name,
        )
        for scope in _TIMES_SOURCES
    }
    setup, selects = [], {}
    for scope, (table, key, kept) in _TIMES_SOURCES.items():
        attributes = chosen[scope]
        ids = "tenant" if scope == "tenant" else "user_id, tenant"
        if not attributes:
            selects[scope] = (
                f"select {ids} from (select cast(null as varchar) as user_id, "
                "cast(null as varchar) as tenant) as nothing where false"
            )
            continue
        variable = f"{scope}_times"
        columns = escape(
            ",\n    ".join(
                f"{render(pair_attribute(a), pretty=False)} as {render(a.column(), pretty=False)}"
                for a in attributes
            )
        )
        extract = (
            f"select\n    {key},\n    updated_at,\n    deleted_at is null as is_current,\n"
            "    current_timestamp as extracted_at,\n"
            f"    {ids},\n    {columns}\nfrom (\n"
            f"    select {key}, updated_at, deleted_at, {kept}\n"
            f"    from {{{{ source('warehouse', '{table}') }}}}\n) as rows"
        )
        setup.append(
            escape(f'-- the {scope}s\' timestamps that per-tenant audiences compare with "now"\n')
            + f"create table if not exists {{{{ {variable} }}}} as\n{extract}\nwhere false;\n"
            f"create or replace temp table {variable}_after as\n"
            f"select coalesce(max(updated_at), timestamptz '0001-01-01 00:00:00+00') as after\n"
            f"from {{{{ {variable} }}}};\n"
            f"delete from {{{{ {variable} }}}}\nwhere {key} in (\n"
            f"    select {key} from {{{{ source('warehouse', '{table}') }}}}\n"
            f"    where updated_at > (select after from {variable}_after)\n);\n"
            f"insert into {{{{ {variable} }}}}\n{extract}\n"
            f"where updated_at > (select after from {variable}_after);"
        )
        parts = []
        for window in sorted(
            (w for w in windows if w.attribute.scope == scope),
            key=lambda w: (w.attribute.column_name, w.minutes),
        ):
            moved = window.moved_over(window.attribute.column(), previous_sql, current_sql)
            text = escape(render(moved))
            text = text.replace(previous, "{{ previous_now }}").replace(
                current, "{{ current_now }}"
            )
            parts.append(f"select {ids} from {{{{ {variable} }}}}\nwhere is_current and {text}")
        selects[scope] = "\n\nunion all\n\n".join(parts)
    return "\n\n".join(setup), selects["tenant"], selects["membership"]


def times_spec(windows: Iterable[TimeWindow]) -> dict[str, str | None]:
    """Per scope, the hash that names its table of timestamps (`TIMES_TABLE`): of the columns it
    keeps; None when no window compares that scope's timestamps."""
    import hashlib

    spec: dict[str, str | None] = {}
    for scope in _TIMES_SOURCES:
        names = sorted({w.attribute.column_name for w in windows if w.attribute.scope == scope})
        spec[scope] = hashlib.sha256("\n".join(names).encode()).hexdigest()[:10] if names else None
    return spec


def per_tenant_body(flattened_model: str, indented_where: str) -> str:
    """The body of a per-tenant audience's model: its pairs that match `indented_where` (compiled
    SQL, already Jinja-escaped, with our Jinja in place, indented by `models._indent`, which never
    indents a line inside a string literal: a property name may hold a newline)."""
    pairs = pairs_sql(
        f"{{{{ ref('{flattened_model}') }}}}",
        f"{{{{ ref('{MEMBERSHIPS_MODEL}') }}}}",
        f"{{{{ ref('{TENANTS_MODEL}') }}}}",
    )
    indented_pairs = "\n".join(f"    {line}" for line in pairs.splitlines())
    return f"""
-- One row per (user, tenant) pair: the tenant memberships whose user and tenant exist.
select
    user_key,
    user_id,
    tenant
from (
{indented_pairs}
) as pairs
where
{indented_where}
"""
