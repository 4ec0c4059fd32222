[# int_event_state: per user and event condition, what its verdict needs (audiences/dbt/events.py).
   `about` describes each condition; `incremental` and `whole` are the compiler's statement for
   all of them, from the state and the new events, and from every event. #]
[[ header ]]
{# Per user and event condition that keeps a state (docs/conditions.md, "Event state"): the times
   of the user's qualifying events the verdict needs (`times`, newest first), the time at which the
   verdict can next change (`next_change`), the latest such time a build passed (`due_at`), the
   verdict at the build's "now" (`holds`, which audience_members reads while it is current) and
   the latest build that changed it (`changed_at`), which int_event_users_to_reevaluate lists.
   A build recomputes only the users with events loaded
   since the condition's marker row (`user_number` [[ marker ]]: the events covered and the "now"
   kept at), and those whose `next_change` "now" reached, from their kept times and new events
   alone. A condition without a marker, or kept at a later "now" than this build's (time went
   back), is recomputed from every event, its users all due. The conditions, by state key:
[% for line in about %]
   - [[ line ]]
[% endfor %]
#}

{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key=['state_key', 'user_number'],
        on_schema_change='append_new_columns',
        post_hook="delete from {{ this }} where state_key not in ([[ keys or "''" ]])",
    )
}}

{% set through = newest_event_seq() %}
{% set now = evaluation_time_literal() %}

{% if is_incremental() %}

{% do event_state_columns(this, [('holds', 'boolean'), ('changed_at', 'timestamptz')]) %}
{% set markers = event_state_markers(this, now) %}
{% set due = now %}
[[ incremental ]]

{% else %}

[[ whole ]]

{% endif %}
