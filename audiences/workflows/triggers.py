"""Workflow triggers: which workflow runs when users enter or exit an audience.

Triggers are files beside the audience definitions, one folder per workflow (Knock allows one
audience per workflow): `<workflows>/<workflow_key>/trigger.json`:

```json
{
  "audience": "power-users",
  "on": "entered",
  "trigger_frequency": "every_trigger",
  "conditions": {"all": [{"variable": "recipient.locale", "operator": "equal_to", "argument": "en"}]},
  "sink": "knock",
  "data": {"campaign": "power-users-welcome"}
}
```

- `on`: `entered` (Knock's audience trigger) or `exited` (beyond Knock). Default `entered`.
- `trigger_frequency`: `every_trigger` (default), `once_per_recipient`, `once_per_recipient_per_tenant`.
- `conditions` (optional): Knock's condition model, evaluated against the recipient when the event
  is published; a list (ANDed), `{"all": [...]}`, or `{"any": [condition or {"all": [...]}]}`.
  Only `recipient.*` variables and audience membership apply to audience-triggered runs.
- `sink` (optional): a sink name from `sinks.yml`; default: that file's default sink.
- `data` (optional): static data added to the trigger's `data` next to the event fields.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from audiences.conditions.compiler import RECIPIENT, Condition, ConditionError, attributes_used
from audiences.conditions.definitions import DefinitionError, Problem
from audiences.membership.events import MembershipEvent

WORKFLOW_KEY = re.compile(r"[a-z0-9_-]{3,255}")
TRIGGER_FILE = "trigger.json"
FREQUENCIES = ("every_trigger", "once_per_recipient", "once_per_recipient_per_tenant")
EVENTS = ("entered", "exited")


@dataclass(frozen=True)
class WorkflowTrigger:
    workflow_key: str
    audience_key: str
    on: str = "entered"
    trigger_frequency: str = "every_trigger"
    segments: tuple[tuple[Condition, ...], ...] = ()
    sink: str | None = None
    data: dict = field(default_factory=dict, compare=False)
    file: Path | None = None

    @property
    def has_conditions(self) -> bool:
        return bool(self.segments)


def condition_segments(raw: object, location: str) -> tuple[tuple[Condition, ...], ...]:
    """Knock condition groups (list, `all`, `any` of conditions and `all` groups) as OR-of-AND
    segments. They read the recipient: `tenant.*` and `membership.*` belong to per-tenant
    audiences, and are refused here naming the property."""
    segments = _condition_segments(raw, location)
    for segment in segments:
        for condition in segment:
            if condition.scope != RECIPIENT:
                raise ConditionError(
                    f"{condition.location}: `{condition.property_name}` reads the "
                    f"{condition.scope}; these conditions read the recipient (a property of "
                    f"the user named {condition.scope!r} is `recipient.{condition.scope}...`)",
                    field="property",
                )
    return segments


def _condition_segments(raw: object, location: str) -> tuple[tuple[Condition, ...], ...]:
    if raw is None:
        return ()
    if isinstance(raw, list):
        return (tuple(Condition.from_json(c, f"{location}[{i}]") for i, c in enumerate(raw)),)
    if isinstance(raw, dict) and "all" in raw and isinstance(raw["all"], list):
        return (
            tuple(Condition.from_json(c, f"{location}.all[{i}]") for i, c in enumerate(raw["all"])),
        )
    if isinstance(raw, dict) and "any" in raw and isinstance(raw["any"], list):
        segments = []
        for i, item in enumerate(raw["any"]):
            if isinstance(item, dict) and "all" in item:
                segments.extend(_condition_segments(item, f"{location}.any[{i}]"))
            else:
                segments.append((Condition.from_json(item, f"{location}.any[{i}]"),))
        return tuple(segments)
    raise ConditionError(
        'conditions are a list, {"all": [...]} or {"any": [...]}', field="conditions"
    )


def _parse(
    raw: object, workflow_key: str, file: Path, audiences: set[str], sinks: set[str] | None
) -> WorkflowTrigger:
    where = str(file)
    problems: list[Problem] = []
    if not WORKFLOW_KEY.fullmatch(workflow_key):
        problems.append(
            Problem(where, "$", f"bad workflow key {workflow_key!r}: 3-255 of a-z, 0-9, '-', '_'")
        )
    if not isinstance(raw, dict):
        raise DefinitionError([*problems, Problem(where, "$", "a trigger must be a JSON object")])
    audience = raw.get("audience")
    if not isinstance(audience, str) or audience not in audiences:
        problems.append(Problem(where, "$.audience", f"unknown audience {audience!r}"))
    on = raw.get("on", "entered")
    if on not in EVENTS:
        problems.append(Problem(where, "$.on", f'`on` is "entered" or "exited", got {on!r}'))
    frequency = raw.get("trigger_frequency", "every_trigger")
    if frequency not in FREQUENCIES:
        problems.append(
            Problem(
                where,
                "$.trigger_frequency",
                f"`trigger_frequency` is one of {', '.join(FREQUENCIES)}",
            )
        )
    sink = raw.get("sink")
    if sink is not None and sinks is not None and sink not in sinks:
        problems.append(
            Problem(where, "$.sink", f"unknown sink {sink!r}; sinks: {', '.join(sorted(sinks))}")
        )
    data = raw.get("data", {})
    if not isinstance(data, dict):
        problems.append(Problem(where, "$.data", "`data` must be an object"))
    segments: tuple = ()
    try:
        segments = condition_segments(raw.get("conditions"), "$.conditions")
        for condition in (c for s in segments for c in s):
            if condition.operator == "is_in_random_cohort":
                continue
            attributes_used([[condition]])
    except ConditionError as error:
        problems.append(
            Problem(
                where, f"$.conditions.{error.field}" if error.field else "$.conditions", str(error)
            )
        )
    if problems:
        raise DefinitionError(problems)
    return WorkflowTrigger(workflow_key, audience, on, frequency, segments, sink, data, file)


def load_triggers(
    folder: Path, audiences: set[str], sinks: set[str] | None = None
) -> dict[str, WorkflowTrigger]:
    """Every `<folder>/<workflow_key>/trigger.json`; a missing folder means no triggers."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    triggers, problems = {}, []
    for file in sorted(folder.glob(f"*/{TRIGGER_FILE}")):
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
            trigger = _parse(raw, file.parent.name, file, audiences, sinks)
        except ValueError as error:
            if isinstance(error, DefinitionError):
                problems.extend(error.problems)
            else:
                problems.append(Problem(str(file), "$", f"not valid JSON: {error}"))
            continue
        triggers[trigger.workflow_key] = trigger
    if problems:
        raise DefinitionError(problems)
    return triggers


def trigger_payload(trigger_data: dict, event: MembershipEvent) -> dict:
    """The workflow trigger body for one membership event (the Knock reference, section 10.7)."""
    body: dict = {
        "recipients": [event.user_id],
        "data": {
            **trigger_data,
            "audience_key": event.audience_key,
            "event": event.event_type,
            "event_id": event.event_id,
            "occurred_at": event.occurred_at,
        },
    }
    if event.tenant is not None:
        body["tenant"] = event.tenant
    return body
