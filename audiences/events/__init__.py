"""Events in: tracked events (what users did) from files and warehouse tables, into `raw.events`.

Event conditions (`performed`, `last_performed_before/after`: docs/conditions.md) count these.
Events are append-only and identified by their message id: a message id seen before is the same
event, counted once as it first arrived. A row without a user id, an event name, a message id or a
readable timestamp goes to `raw.events_quarantine` with its reason. An event of a user nobody has
loaded yet is kept: it counts from the moment the user is identified.
"""
