"""What a commit or promotion would do to an environment's members, before it happens.

For each changed audience, against the target environment's warehouse as it is now: its members
now and after the change, who would enter and exit (with a sample of ids each way), the workflow
deliveries that would follow per trigger, and whether the circuit breaker would hold them. The new
definition is compiled by the same compiler as every evaluation and run as one DuckDB query per
audience over the environment's flattened attributes, so it reads nothing it does not need.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime

from audiences.conditions.definitions import AudienceDefinition, parse_definition
from audiences.membership.changes import CircuitBreaker
from audiences.settings import Settings, format_time, utc_now
from audiences.warehouse.queries import (
    MEMBERS_TABLE,
    connect,
    matching_users_sql,
    table_exists,
)

SAMPLE_SIZE = 5


@dataclass
class TriggerImpact:
    workflow_key: str
    on: str
    deliveries: int
    # A trigger with conditions, or one that fires once per recipient, sends at most this many.
    is_upper_bound: bool


@dataclass
class AudienceImpact:
    audience_key: str
    change: str  # created | modified | archived | unchanged
    members_now: int
    members_after: int
    entered: int
    exited: int
    entered_sample: list[str]
    exited_sample: list[str]
    # A new audience's first members trigger nothing (no backfill).
    is_new: bool
    # The circuit breaker would hold the change's deliveries until `release` or `discard`.
    would_hold: bool
    triggers: list[TriggerImpact] = field(default_factory=list)

    @property
    def deliveries(self) -> int:
        return sum(trigger.deliveries for trigger in self.triggers)


@dataclass
class Impact:
    environment: str
    evaluated_at: datetime
    users: int
    audiences: list[AudienceImpact]

    def as_json(self) -> dict:
        return {
            "environment": self.environment,
            "evaluated_at": format_time(self.evaluated_at),
            "users": self.users,
            "audiences": [
                {**asdict(audience), "deliveries": audience.deliveries}
                for audience in self.audiences
            ],
            "would_hold": [a.audience_key for a in self.audiences if a.would_hold],
        }


def impact(
    settings: Settings,
    environment: str,
    before: dict[str, dict | None],
    after: dict[str, dict | None],
    now: datetime | None = None,
) -> Impact:
    """The impact on `environment` of moving each audience in `after` from its definition in
    `before` (None: it does not exist there) to its new one (None: archived)."""
    from audiences.workflows.triggers import load_triggers

    target = settings.for_environment(environment)
    now = now or settings.evaluation_time or utc_now()
    breaker = CircuitBreaker(settings.breaker_share, settings.breaker_minimum)
    # Triggers are checked against their audiences by `validate` and every run; here only those
    # of the changed audiences count, whatever else the environment lacks.
    triggers = [
        trigger
        for trigger in load_triggers(target.workflows_dir, _trigger_audiences(target)).values()
        if trigger.audience_key in after
    ]
    definitions = {
        key: parse_definition(document, key, target.definitions_dir / key / "audience.json")
        for key, document in _definitions_after(target, after).items()
    }
    results: list[AudienceImpact] = []
    users = 0
    if not target.duckdb_path.exists():
        connection = None
    else:
        connection = connect(target.duckdb_path, read_only=True)
    try:
        if connection is not None and table_exists(connection, "raw.users"):
            users = connection.execute(
                "select count(*) from raw.users where deleted_at is null"
            ).fetchall()[0][0]
        results = _measure(connection, after, before, definitions, now)
    finally:
        if connection is not None:
            connection.close()
    for result in results:
        result.would_hold = not result.is_new and breaker.trips(
            max(result.entered, result.exited), result.members_now
        )
        if result.is_new or result.change == "archived":
            continue  # a new audience backfills nothing; an archived one triggers nothing
        for trigger in triggers:
            if trigger.audience_key != result.audience_key:
                continue
            moved = result.entered if trigger.on == "entered" else result.exited
            result.triggers.append(
                TriggerImpact(
                    trigger.workflow_key,
                    trigger.on,
                    moved,
                    trigger.has_conditions or trigger.trigger_frequency != "every_trigger",
                )
            )
    return Impact(environment, now, users, results)


def _trigger_audiences(settings: Settings) -> set[str]:
    """The audience each trigger file names (unreadable files are left to `load_triggers`)."""
    import json

    names = set()
    folder = settings.workflows_dir
    for path in sorted(folder.glob("*/trigger.json")) if folder and folder.is_dir() else []:
        try:
            names.add(str(json.loads(path.read_text(encoding="utf-8")).get("audience")))
        except (ValueError, AttributeError):
            continue
    return names


def _definitions_after(settings: Settings, after: dict[str, dict | None]) -> dict[str, dict]:
    """The environment's definitions once the change is made: its files, with the change applied
    (references from changed audiences resolve against them)."""
    import json

    documents = {}
    for path in (
        sorted(settings.definitions_dir.glob("*/audience.json"))
        if settings.definitions_dir.is_dir()
        else []
    ):
        documents[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
    for key, document in after.items():
        if document is None:
            documents.pop(key, None)
        else:
            documents[key] = document
    return documents


def _measure(
    connection,
    after: dict[str, dict | None],
    before: dict[str, dict | None],
    definitions: dict[str, AudienceDefinition],
    now: datetime,
) -> list[AudienceImpact]:
    """Every changed audience's members now and after, entering and exiting, in one DuckDB query:
    the new definitions' matches (one branch each, scanned in parallel) against the members the
    environment's last evaluation recorded."""
    from sqlglot import exp

    keys = sorted(after)
    changes = {
        key: "archived"
        if after[key] is None
        else "created"
        if before.get(key) is None
        else "modified"
        for key in keys
    }
    empty = {
        key: AudienceImpact(key, changes[key], 0, 0, 0, 0, [], [], before.get(key) is None, False)
        for key in keys
    }
    if connection is None or not table_exists(connection, "raw.users"):
        return [empty[key] for key in keys]
    evaluated = table_exists(connection, MEMBERS_TABLE)
    now_members = (
        f"select distinct audience_key, user_key from {MEMBERS_TABLE} "
        "where list_contains($keys, audience_key)"
        if evaluated
        else "select null::varchar as audience_key, null::integer as user_key where false"
    )
    branches = ["select null::varchar as audience_key, null::integer as user_key where false"]
    for key in keys:
        label = exp.Literal.string(key).sql(dialect="duckdb")
        definition = definitions.get(key)
        if definition is None:
            continue  # archived: nobody after
        if definition.type == "static":  # static members are added, not matched
            branches.append(
                f"select audience_key, user_key from now_members where audience_key = {label}"
            )
        else:
            matching = matching_users_sql(connection, definition, definitions, now)
            branches.append(f"select {label} as audience_key, user_key from ({matching})")
    rows = connection.execute(
        f"""
        with now_members as materialized ({now_members}),
        after_members as materialized ({" union all ".join(branches)}),
        entering as materialized (select * from after_members except select * from now_members),
        exiting as materialized (select * from now_members except select * from after_members),
        counted as (
            select audience_key, 'now' as side, count(*) as total, [] as sample from now_members group by all
            union all
            select audience_key, 'after', count(*), [] from after_members group by all
            union all
            select audience_key, 'entering', count(*), [] from entering group by all
            union all
            select audience_key, 'exiting', count(*), [] from exiting group by all
        ),
        sampled as (
            select audience_key, side, 0 as total, list(user_id order by user_id) as sample
            from (
                select side, moved.audience_key, users.user_id
                from (
                    select 'entering' as side, * from entering
                    union all
                    select 'exiting', * from exiting
                ) as moved
                join raw.users as users using (user_key)
                qualify row_number() over (
                    partition by side, moved.audience_key order by users.user_id
                ) <= {SAMPLE_SIZE}
            )
            group by all
        )
        select audience_key, side, total, sample from counted
        union all
        select audience_key, side || '_sample', total, sample from sampled
        """,
        {"keys": keys},
    ).fetchall()
    found: dict[str, dict] = {key: {} for key in keys}
    for key, side, total, sample in rows:
        if key in found:
            found[key][side] = list(sample) if side.endswith("_sample") else total
    return [
        AudienceImpact(
            key,
            changes[key],
            found[key].get("now", 0),
            found[key].get("after", 0),
            found[key].get("entering", 0),
            found[key].get("exiting", 0),
            found[key].get("entering_sample", []),
            found[key].get("exiting_sample", []),
            before.get(key) is None,
            False,
        )
        for key in keys
    ]


def format_impact(result: Impact) -> list[str]:
    """The impact as lines for a terminal."""
    lines = [
        f"impact on {result.environment} ({result.users:,} users, at {format_time(result.evaluated_at)}):"
    ]
    if not result.audiences:
        lines.append("  no audience changes")
    for audience in result.audiences:
        lines.append(
            f"  {audience.audience_key} ({audience.change}): {audience.members_now:,} members now, "
            f"{audience.members_after:,} after: +{audience.entered:,} entered, -{audience.exited:,} exited"
        )
        if audience.entered_sample:
            lines.append(f"    entering: {', '.join(audience.entered_sample)}")
        if audience.exited_sample:
            lines.append(f"    exiting:  {', '.join(audience.exited_sample)}")
        if audience.is_new:
            lines.append("    new audience: its first members trigger no workflow (no backfill)")
        for trigger in audience.triggers:
            bound = "up to " if trigger.is_upper_bound else ""
            lines.append(
                f"    workflow {trigger.workflow_key} (on {trigger.on}): {bound}{trigger.deliveries:,} deliveries"
            )
        if audience.would_hold:
            lines.append(
                "    CIRCUIT BREAKER: this change moves too much of the audience; its deliveries would "
                "be held until `audiences release` or `discard`"
            )
    return lines
