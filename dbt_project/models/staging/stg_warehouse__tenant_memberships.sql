-- Which users belong to which tenants (not deleted), with the membership's properties: what
-- `membership.*` reads in per-tenant audiences. Rows naming a user or tenant that is not loaded
-- are here too; per-tenant audiences join them away.

select
    membership_key,
    user_id,
    tenant_id,
    properties,
    updated_at
from {{ source('warehouse', 'tenant_memberships') }}
where deleted_at is null
