-- Knock's tenants that exist (not deleted): what `tenant.*` reads in per-tenant audiences.

select
    tenant_key,
    tenant_id,
    properties ->> '$.name' as name,
    properties,
    updated_at
from {{ source('warehouse', 'tenants') }}
where deleted_at is null
