"""What a commit or promotion would do to an environment's members, before it happens.

For each changed audience, against the target environment as it is now: its members now (the
open membership intervals its history holds, which the promotion's diff compares with; a static
audience's members in its store) and after the change, who would enter and exit (with a sample of
ids each way), the workflow deliveries that would follow per trigger, and whether the circuit
breaker would hold them. The new definitions are compiled by the same compiler as every
evaluation and evaluated read-only in DuckDB over the environment's current users (no dbt,
nothing written): most in one pass per 64 audiences, the few that need it alone (`_measure`).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from sqlglot import exp

from audiences.conditions.definitions import AudienceDefinition, parse_definition
from audiences.membership.changes import CircuitBreaker
from audiences.settings import Settings, format_time, utc_now
from audiences.warehouse.queries import MEMBERS_TABLE, members_query, reading, table_exists

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
    # How it was measured: "scan" (with the other audiences over users' properties, in one pass),
    # or "alone: <why>" (per tenant, event conditions, reading a changed audience).
    method: str = "scan"

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
    definitions = _parsed(target, after)
    results: list[AudienceImpact] = []
    users = 0
    with contextlib.ExitStack() as opened:
        # Read as a command reads: a run writing the warehouse now is waited for, none starts meanwhile.
        connection = (
            opened.enter_context(reading(target.duckdb_path))
            if target.duckdb_path.exists()
            else None
        )
        if connection is not None and table_exists(connection, "raw.users"):
            users = connection.execute(
                "select count(*) from raw.users where deleted_at is null"
            ).fetchall()[0][0]
        static = [
            key for key, each in definitions.items() if key in after and each.type == "static"
        ]
        results = _measure(
            connection, after, before, definitions, now, static_member_counts(target, static)
        )
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


def _parsed(settings: Settings, after: dict[str, dict | None]) -> dict[str, AudienceDefinition]:
    """The changed definitions, parsed and checked, with the environment's definitions they read
    (at any depth: their conditions compile, they are the environment's own), so that a change
    to one audience of thousands parses a few."""
    documents = _definitions_after(settings, after)
    definitions: dict[str, AudienceDefinition] = {}
    waiting = sorted(key for key, document in after.items() if document is not None)
    while waiting:
        key = waiting.pop()
        if key in definitions or key not in documents:
            continue
        definitions[key] = parse_definition(
            documents[key],
            key,
            settings.definitions_dir / key / "audience.json",
            compile_conditions=key in after,
        )
        waiting.extend(sorted(definitions[key].references()))
    return definitions


# Audiences evaluated in one pass over the users: each is one bit of an unsigned 64-bit integer.
SCAN_BATCH = 64
# The members the target holds now: its open membership intervals, which the promotion's diff
# compares its evaluation with (`record_changes`), not the last evaluation's `audience_members`,
# which may not have been recorded yet.
OPEN_INTERVALS = "(select * from raw.membership_intervals where exited_at is null)"
# DuckDB aggregates by a perfect hash (an array indexed by the key) when the keys' range has at
# most this many bits, instead of a hash table: the members now, grouped by user key, take half
# the time (`bench/analysis.md`, "The promotion dry run").
PERFECT_HASH_BITS = 24


def _measure(
    connection,
    after: dict[str, dict | None],
    before: dict[str, dict | None],
    definitions: dict[str, AudienceDefinition],
    now: datetime,
    static_members: dict[str, int],
) -> list[AudienceImpact]:
    """Every changed audience's members now and after, entering and exiting, read-only in DuckDB.

    Members now are the target's current members as its history holds them: the open membership
    intervals (a static audience's: its members in the store, `static_members`). Dynamic
    audiences over users' properties (the most) are measured together, one pass over the users
    per batch (`_scan`). A per-tenant audience (by (user, tenant) pairs) and one with event
    conditions are measured one by one (`_alone`), and say so (`method`). A changed audience that
    a changed one reads is read at its new members (its query inlined, or its result kept), as
    the evaluation will. Static audiences keep their members; archived ones lose them all."""
    keys = sorted(after)
    changes = {
        key: "archived"
        if after[key] is None
        else "created"
        if before.get(key) is None
        else "modified"
        for key in keys
    }
    results = {
        key: AudienceImpact(key, changes[key], 0, 0, 0, 0, [], [], before.get(key) is None, False)
        for key in keys
    }
    static = [key for key in keys if key in definitions and definitions[key].type == "static"]
    for key in static:
        count = static_members.get(key, 0)
        results[key] = replace(results[key], members_now=count, members_after=count)
    if connection is None or not table_exists(connection, "raw.users"):
        return [results[key] for key in keys]
    connection.execute(f"set perfect_ht_threshold = {PERFECT_HASH_BITS}")
    recorded = table_exists(connection, "raw.membership_intervals")
    alone = _evaluated_alone(keys, definitions)
    # The changed audiences that changed ones read are read at their new members: their query
    # inlined (or, for one evaluated alone, its kept result), in the order they read each other.
    read = {
        other
        for key in keys
        if key in definitions
        for other in definitions[key].references()
        if other in after
    }
    replaced: dict = {
        key: exp.select("user_key", "tenant").from_(MEMBERS_TABLE).where(exp.false())
        for key in read
        if key not in definitions  # archived: no one
    }
    for key in _in_dependency_order(
        [key for key in keys if key in alone or (key in read and key in definitions)], definitions
    ):
        if key in alone:
            found, members = _alone(connection, key, definitions, now, recorded, replaced)
            results[key] = replace(results[key], **found, method=f"alone: {alone[key]}")
            replaced[key] = members
        elif definitions[key].type == "dynamic":
            replaced[key] = members_query(connection, definitions[key], definitions, now, replaced)
    scanned = [key for key in keys if key not in alone and key not in static]
    for batch in range(0, len(scanned), SCAN_BATCH):
        chosen = scanned[batch : batch + SCAN_BATCH]
        for key, found in _scan(connection, chosen, definitions, now, recorded, replaced).items():
            results[key] = replace(results[key], **found)
    return [results[key] for key in keys]


def _evaluated_alone(keys: list[str], definitions: dict[str, AudienceDefinition]) -> dict[str, str]:
    """The changed audiences the scan does not evaluate, each with why: per tenant (members are
    (user, tenant) pairs), or with event conditions (counted over the loaded events)."""
    from audiences.conditions.compiler import EVENT_OPERATORS

    reasons: dict[str, str] = {}
    for key in keys:
        definition = definitions.get(key)
        if definition is None or definition.type != "dynamic":
            continue
        if definition.per_tenant:
            reasons[key] = "per tenant"
        elif any(c.operator in EVENT_OPERATORS for s in definition.segments for c in s):
            reasons[key] = "event conditions"
    return reasons


def _in_dependency_order(keys, definitions: dict[str, AudienceDefinition]) -> list[str]:
    """The keys, each after the changed audiences it reads (the definitions have no cycles:
    `validate` refuses them)."""
    ordered: list[str] = []

    def visit(key: str) -> None:
        if key in ordered or key not in keys:
            return
        for read in sorted(definitions[key].references()):
            visit(read)
        ordered.append(key)

    for key in sorted(keys):
        visit(key)
    return ordered


def _scan(
    connection,
    keys: list[str],
    definitions: dict[str, AudienceDefinition],
    now: datetime,
    recorded: bool,
    replaced: dict,
) -> dict[str, dict]:
    """Members now and after, entering and exiting with samples, for at most `SCAN_BATCH`
    audiences over users without tenants (an archived one: no one after), in one query.

    Each audience is one bit (its place in `keys`): one pass over the users gives each user the
    bits of the new definitions it matches (each definition's condition, compiled by the one
    compiler, a `case` that DuckDB evaluates short-circuiting, as a filter); the open intervals,
    grouped by user, the bits of the audiences it is a member of now. The two are fully joined
    on the user (one row a side per user, not one per membership), and only the users whose bits
    differ are kept, grouped by which bits they gain and lose: a few thousand groups, each with its
    count and five lowest user keys, from which every audience's entering and exiting counts and
    samples follow (an audience's five lowest movers are among the five lowest of the groups that
    move it)."""
    from audiences.warehouse.queries import matching_scan

    dynamic = [definitions[key] for key in keys if key in definitions]  # the others: archived
    source, conditions = matching_scan(connection, dynamic, definitions, now, replaced)
    number = {key: place for place, key in enumerate(keys)}
    bits = " + ".join(
        ["0::ubigint"]
        + [
            f"(case when {condition} then {1 << number[definition.key]}::ubigint "
            "else 0::ubigint end)"
            for definition, condition in zip(dynamic, conditions, strict=True)
        ]
    )
    found = {
        key: {
            "members_now": 0,
            "entered": 0,
            "exited": 0,
            "entered_sample": [],
            "exited_sample": [],
        }
        for key in keys
    }
    parameters = {}
    if recorded:
        parameters = {"keys": keys}
        now_members = f"""
            select intervals.user_key, bit_or(1::ubigint << chosen.number) as bits
            from {OPEN_INTERVALS} as intervals
            join (select unnest($keys) as audience_key, generate_subscripts($keys, 1) - 1 as number)
                as chosen using (audience_key)
            where intervals.tenant is null
            group by intervals.user_key
        """
        for key, count in connection.execute(
            f"select audience_key, count(*) from {OPEN_INTERVALS} "
            "where tenant is null and list_contains($keys, audience_key) group by all",
            parameters,
        ).fetchall():
            found[key]["members_now"] = count
    else:
        now_members = "select null::integer as user_key, null::ubigint as bits where false"
    groups = connection.execute(
        f"""
        with after_members as (select users.user_key, {bits} as bits from {source}),
        now_members as ({now_members}),
        compared as (
            select user_key,
                coalesce(after_members.bits, 0::ubigint) as after_bits,
                coalesce(now_members.bits, 0::ubigint) as now_bits
            from after_members
            full join now_members using (user_key)
        )
        select after_bits & ~now_bits, now_bits & ~after_bits, count(*), min(user_key, {SAMPLE_SIZE})
        from compared
        where after_bits <> now_bits
        group by all
        """,
        parameters,
    ).fetchall()
    samples: dict[tuple[int, str], list[int]] = {}
    for entering, exiting, count, lowest in groups:
        for bits_of, side in ((entering, "entered"), (exiting, "exited")):
            while bits_of:
                place = (bits_of & -bits_of).bit_length() - 1
                bits_of &= bits_of - 1
                found[keys[place]][side] += count
                kept = samples.setdefault((place, side), [])
                kept.extend(lowest)
                if len(kept) > 4 * SAMPLE_SIZE:
                    kept[:] = sorted(kept)[:SAMPLE_SIZE]
    chosen_keys = {place: sorted(kept)[:SAMPLE_SIZE] for place, kept in samples.items()}
    sampled = sorted({key for kept in chosen_keys.values() for key in kept})
    ids = dict(
        connection.execute(
            "select user_key, user_id from raw.users where list_contains($keys, user_key)",
            {"keys": sampled},
        ).fetchall()
        if sampled
        else []
    )
    missing = [key for key in sampled if key not in ids]
    if missing and recorded:  # a user gone from raw.users: the id its interval kept
        ids.update(
            connection.execute(
                f"select user_key, any_value(user_id) from {OPEN_INTERVALS} "
                "where list_contains($keys, user_key) group by all",
                {"keys": missing},
            ).fetchall()
        )
    for (place, side), kept in chosen_keys.items():
        found[keys[place]][f"{side}_sample"] = [ids[key] for key in kept if key in ids]
    for each in found.values():
        each["members_after"] = each["members_now"] + each["entered"] - each["exited"]
    return found


def static_member_counts(settings: Settings, keys: list[str]) -> dict[str, int]:
    """Per static audience, its members as the environment's store holds them now (they are
    added and removed there, and reach the warehouse only at the next run); nothing for a store
    that does not exist yet (a dry run creates nothing)."""
    if not keys:
        return {}
    import sqlalchemy as sa

    from audiences.store import database as tables
    from audiences.store.database import MembershipStore

    url = settings.store_url
    database = sa.engine.make_url(url).database
    if url.startswith("sqlite") and database and not Path(database).expanduser().exists():
        return {}
    store = MembershipStore(url)
    try:
        if not sa.inspect(store.read_engine).has_table(tables.audience_members.name):
            return {}
        members = tables.audience_members
        with store.read_engine.connect() as connection:
            return dict(
                connection.execute(
                    sa.select(members.c.audience_key, sa.func.count())
                    .where(members.c.audience_key.in_(keys))
                    .group_by(members.c.audience_key)
                ).all()
            )
    finally:
        store.dispose()


def _alone(
    connection,
    key: str,
    definitions: dict[str, AudienceDefinition],
    now: datetime,
    recorded: bool,
    replaced: dict,
) -> tuple[dict, object]:
    """One audience's members now (its open intervals) and after, compared as the warehouse
    records them ((user, tenant) rows), with the changed audiences it reads taken at their new
    members (`replaced`). Returns the counts and the query of its new members (`user_key`,
    `tenant`, kept in a temporary table of this read-only connection, for the audiences that
    read it)."""
    from audiences.conditions.compiler import render

    sql = render(members_query(connection, definitions[key], definitions, now, replaced))
    table = f"impact_after_{len(replaced)}"
    connection.execute(f"create or replace temporary table {table} as {sql}")
    now_members = (
        f"select user_key, tenant from {OPEN_INTERVALS} where audience_key = $key"
        if recorded
        else "select null::integer as user_key, null::varchar as tenant where false"
    )
    row = connection.execute(
        f"""
        with now_members as materialized ({now_members}),
        after_members as (select user_key, tenant from {table}),
        entering as materialized (select * from after_members except all select * from now_members),
        exiting as materialized (select * from now_members except all select * from after_members)
        select
            (select count(*) from now_members),
            (select count(*) from after_members),
            (select count(*) from entering),
            (select count(*) from exiting),
            (select min(user_id, {SAMPLE_SIZE}) from entering join raw.users using (user_key)),
            (select min(user_id, {SAMPLE_SIZE}) from exiting join raw.users using (user_key))
        """,
        {"key": key} if recorded else {},
    ).fetchone()
    found = dict(
        zip(
            ("members_now", "members_after", "entered", "exited"),
            row[:4],
            strict=True,
        )
    )
    found["entered_sample"] = list(row[4] or [])
    found["exited_sample"] = list(row[5] or [])
    return found, exp.select("user_key", "tenant").from_(table)


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
        if audience.method != "scan":
            lines.append(f"    evaluated on its own ({audience.method.removeprefix('alone: ')})")
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
