[# One batch of audience_members: the SELECTs of at most MEMBERS_BATCH_SIZE audiences, one
   statement. Each branch is built by audiences/dbt/models.py (`_members_branches`). #]
[[ header ]]
{# Batch [[ number ]] of [[ batches ]] of audience_members: one statement (macros/audience_members.sql). #}

{% macro [[ name ]](per_user, idle) %}

[[ union ]]

{% endmacro %}
