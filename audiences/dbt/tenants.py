"""Per-tenant audiences in dbt: an audience with `"tenancy": "per_tenant"` is evaluated once per
(user, tenant) pair the user belongs to.

The pairs are the tenant memberships whose user and tenant both exist: each row has the user's
typed columns (`int_users_flattened`, which `recipient.*` reads), the tenant's id (`tenant`) and
the JSON of the tenant and of the membership (`tenant_properties`, `membership_properties`, which
`tenant.*` and `membership.*` read through `compiler.pair_attribute`: the same typed views, so the
same operators and rules). Members are `(user_key, user_id, tenant)` rows, the contract every
audience model keeps; `audience_members` evaluates these audiences whole.
"""

from __future__ import annotations

TENANTS_MODEL = "stg_warehouse__tenants"
MEMBERSHIPS_MODEL = "stg_warehouse__tenant_memberships"


def pairs_sql(users: str, memberships: str, tenants: str) -> str:
    """The (user, tenant) pairs over these relations (SQL of our own, no user text): every column
    of `users`, then `tenant`, `tenant_properties` and `membership_properties`."""
    return f"""select
    users.*,
    memberships.tenant_id as tenant,
    tenants.properties as tenant_properties,
    memberships.properties as membership_properties
from {users} as users
inner join {memberships} as memberships on memberships.user_id = users.user_id
inner join {tenants} as tenants on tenants.tenant_id = memberships.tenant_id"""


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
