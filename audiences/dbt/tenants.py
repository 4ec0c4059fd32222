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


def pair_windows_sql(
    windows: Iterable[TimeWindow], previous: str, current: str, escape: Callable[[str], str]
) -> tuple[str, str]:
    """Two selects for the pairs "now" moved over, given placeholders for the two times (replaced
    by the Jinja `previous_now` and `current_now`) and `escape` (makes user text inert for Jinja):
    the tenants
    (`tenant`) whose timestamp lies in a window of scope `tenant`, and the memberships (`user_id`,
    `tenant`) whose timestamp lies in one of scope `membership`. Each is `where false` without
    such windows. The windows' timestamps are read from the JSON as the audience reads them
    (`compiler.pair_attribute`)."""
    previous_sql, current_sql = exp.column(previous), exp.column(current)

    def moved(scope: str) -> str:
        predicates = [
            window.moved_over(pair_attribute(window.attribute), previous_sql, current_sql)
            for window in windows
            if window.attribute.scope == scope
        ]
        if not predicates:
            return "false"
        sql = escape(render(exp.or_(*predicates)))
        return sql.replace(previous, "{{ previous_now }}").replace(current, "{{ current_now }}")

    tenants = (
        "select tenant from (\n"
        f"    select tenant_id as tenant, properties as tenant_properties\n"
        f"    from {{{{ ref('{TENANTS_MODEL}') }}}}\n"
        f") as tenants\nwhere\n{moved('tenant')}"
    )
    memberships = (
        "select user_id, tenant from (\n"
        "    select user_id, tenant_id as tenant, properties as membership_properties\n"
        f"    from {{{{ ref('{MEMBERSHIPS_MODEL}') }}}}\n"
        f") as memberships\nwhere\n{moved('membership')}"
    )
    return tenants, memberships


def per_tenant_body(flattened_model: str, where: str) -> str:
    """The body of a per-tenant audience's model: its pairs that match `where` (compiled SQL,
    already Jinja-escaped, with our Jinja in place)."""
    pairs = pairs_sql(
        f"{{{{ ref('{flattened_model}') }}}}",
        f"{{{{ ref('{MEMBERSHIPS_MODEL}') }}}}",
        f"{{{{ ref('{TENANTS_MODEL}') }}}}",
    )
    indented_where = "\n".join(f"    {line}" if line else line for line in where.splitlines())
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
