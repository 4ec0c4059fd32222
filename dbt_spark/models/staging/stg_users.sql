-- The users audiences are evaluated over: every user not deleted.

select
    user_key,
    user_id,
    properties,
    updated_at
from {{ source('raw', 'users') }}
where deleted_at is null
