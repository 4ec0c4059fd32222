[# audience_catalog: one row per audience. `rows` are SQL tuples of literals; `skipped` the
   skipped audiences' keys as a list of literals. #]
[[ header ]]
-- Every audience: defined in files, or written as SQL under models/audiences/custom/. An
-- audience whose definition has errors keeps its last entry, with `is_skipped`.

{{ config(materialized='table') }}

[% if rows %]
select *
from (
    values
[[ rows | join(",\n") ]]
) as catalog ([[ columns ]])
[% else %]
select * from (values (null, null, null, null, null, false)) as catalog ([[ columns ]]) where false
[% endif %]
[% if skipped %]

{% set previous = adapter.get_relation(database=this.database, schema=this.schema, identifier=this.identifier) if execute else none %}
{% if previous is not none %}

union all

{# Skipped: their definitions have errors. Their last entry is kept, and they are not evaluated. #}
select audience_key, audience_name, audience_type, audience_version, model_name, true as is_skipped
from {{ previous }}
where audience_key in ([[ skipped ]])

{% endif %}
[% endif %]
