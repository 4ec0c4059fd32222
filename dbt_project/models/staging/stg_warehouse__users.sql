-- Users as Knock models them: the standard fields as columns, custom properties in `properties`.

with source as (

    select * from {{ source('warehouse', 'users') }}

),

renamed as (

    select
        user_key,
        user_id,
        properties ->> '$.name' as name,
        properties ->> '$.email' as email,
        properties ->> '$.phone_number' as phone_number,
        properties ->> '$.avatar' as avatar,
        properties ->> '$.locale' as locale,
        properties ->> '$.timezone' as timezone,
        properties ->> '$.created_at' as created_at,
        properties,
        first_loaded_at,
        updated_at,
        deleted_at is not null as is_deleted
    from source

)

select * from renamed
