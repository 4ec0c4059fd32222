[# A static audience's model: its members as added (API, CSV, syncs), identified users only. #]
[[ header ]]
-- Audience `[[ key ]]` (static, version [[ version ]]): [[ name ]]
-- Members are added directly (API, CSV, syncs); only identified users are listed here.

{{ config(materialized='view', tags=['audience']) }}

select
    users.user_key,
    users.user_id,
    members.tenant
from {{ source('warehouse', 'static_audience_members') }} as members
inner join {{ ref('[[ users ]]') }} as users
    on users.user_id = members.user_id
    and not users.is_deleted
where members.audience_key = [[ key_literal ]]
