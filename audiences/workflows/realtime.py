"""Real time: a user changed through the API is evaluated at once, with the pipeline's semantics.

An identify through the API (one user, a bulk identify, an inline identify in an add) commits the
patch and the store's copy of the user (`store/profiles.py`). Then, with real time on
(`AUDIENCES_REALTIME`, default on), `decide` evaluates that user's dynamic audiences in an
in-memory DuckDB holding only the user as the store knows them and their memberships (static and
dynamic), with the conditions compiled by the one compiler, audiences that refer to others after
them. Each change against the store's current membership is an entered / exited event with the id
the pipeline's diff gives the same change (`membership/changes.py`: the hash of audience, user,
tenant, type and entry number), written with the current membership, the deliveries of its
workflow triggers and a row of `realtime_events`, in one store transaction.

Which audiences are evaluated at once (`paths`): dynamic audiences whose conditions read only the
user's properties and memberships of static audiences or of such audiences, and that the pipeline
has already evaluated with the same definition (the plan it publishes, `publish_plan`; a new
audience's first members are backfill, which only the pipeline records). Custom SQL audiences,
event (behavioral) audiences, per-tenant audiences and audiences that refer to them wait for the
next run.

The pipeline agrees and never doubles (`import_realtime_events`): before its diff, it imports the
real-time events whose identify patch it has loaded into its membership history, so its diff
starts from the memberships real time left; if its evaluation still differs, the diff's event is
the correction (the batch wins) and the run counts the disagreement. A crash between the
identify's commit and the events' loses nothing: the next run's diff finds the change and records
it with the same id, and the API re-evaluates the users whose patches wait at its start.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from graphlib import TopologicalSorter

import duckdb
import sqlalchemy as sa
from sqlglot import exp

from audiences.conditions.compiler import (
    DIALECT,
    EXTENSION_OPERATORS,
    Attribute,
    CompileContext,
    attribute_expression,
    attributes_used,
    compile_segments,
    property_json,
    render,
    without_tenant,
)
from audiences.conditions.definitions import AudienceDefinition, audiences_referred_to
from audiences.membership.events import MembershipEvent
from audiences.settings import FAULT_POINT
from audiences.store import database as tables
from audiences.store.database import MembershipStore, apply_membership_changes, now_text
from audiences.warehouse.schema import AUDIENCE_MEMBERS_STAND_IN, ensure_user_tables
from audiences.workflows.publish import PublishReport, queue_event_deliveries
from audiences.workflows.triggers import WorkflowTrigger

# The store marker holding the pipeline's plan: {audience key: version} of the dynamic audiences it
# has evaluated, which real time may evaluate when the definition it has is that version.
PLAN_MARKER = "realtime_plan"
# A test's fault point (`settings.FAULT_POINT`): the real-time path kills its own process (SIGKILL)
# right before it commits the events of an identify that has committed.
FAULT_BEFORE_EVENTS = "realtime-before-events"
FAULT_ALSO_KILLS = "_AUDIENCES_FAULT_ALSO_KILLS"  # a process id the fault point kills first
SOURCE = "realtime"
# Plans (the whole plan and its subsets for the properties identifies change) whose statements the
# evaluator keeps prepared.
PREPARED_PLANS = 32
NEXT_RUN_SQL = "a custom SQL audience: evaluated in the warehouse, at the next pipeline run"


def paths(
    definitions: Mapping[str, AudienceDefinition], custom_keys: Iterable[str] = ()
) -> dict[str, str | None]:
    """For each dynamic and custom SQL audience: None when an identify evaluates it at once, else
    why it waits for the next pipeline run."""
    reasons: dict[str, str | None] = dict.fromkeys(custom_keys, NEXT_RUN_SQL)
    known = set(definitions)  # once, not once per audience (quadratic at thousands: issue 25)
    order = TopologicalSorter(
        {key: definition.references() & known for key, definition in definitions.items()}
    )
    for key in order.static_order():
        definition = definitions[key]
        if definition.type != "dynamic":
            continue
        if definition.per_tenant:
            reasons[key] = (
                "is evaluated per tenant, over tenants and memberships only the warehouse holds: "
                "evaluated at the next pipeline run"
            )
            continue
        operators = {c.operator for segment in definition.segments for c in segment}
        if operators & set(EXTENSION_OPERATORS):
            reasons[key] = (
                "reads behavioral events, which only the warehouse holds: evaluated at the next "
                "pipeline run"
            )
            continue
        reasons[key] = None
        for reference in sorted(definition.references()):
            kind = definitions[reference].type if reference in definitions else None
            if kind == "static":
                continue
            if kind is None or reasons.get(reference) is not None:
                reasons[key] = (
                    f"refers to {reference!r}, which is evaluated at the next pipeline run: "
                    "evaluated at the next pipeline run too"
                )
                break
    return reasons


def path_description(reason: str | None) -> str:
    """The catalog's words for an audience's path (`paths`)."""
    if reason is None:
        return (
            "real time: an identify through the API evaluates the user at once; the next "
            "pipeline run confirms"
        )
    return f"next run: {reason}"


# A property name no identify sets: an audience that reads the user's whole properties document
# (or nothing an identify could name) is evaluated at every identify.
EVERY_PROPERTY = "\x00every property"


@dataclass(frozen=True)
class Plan:
    """The audiences real time evaluates, in levels (an audience after those it refers to): the
    query that extracts every attribute they read into one typed column each (as
    `int_users_flattened` does), and one query per level selecting one membership verdict per
    audience of the level over those columns. `reads`: per audience, the top-level properties its
    conditions read, with those of the plan's audiences it refers to (an identify changing none
    of them cannot move the user in or out of it). `table`: the evaluator's table of the users'
    flattened rows, which the level queries read."""

    definitions: dict[str, AudienceDefinition]
    levels: tuple[tuple[str, ...], ...]
    flatten: str
    queries: tuple[str, ...]
    reads: dict[str, frozenset[str]] = field(default_factory=dict)
    table: str = "realtime_users"

    @property
    def keys(self) -> set[str]:
        return set(self.definitions)

    def memberships_read(self, triggers: Iterable[WorkflowTrigger] = ()) -> frozenset[str]:
        """The audiences whose memberships evaluating this plan (and these triggers' conditions)
        reads: those their conditions refer to. The evaluator holds only these of a user's
        memberships (a user is in dozens of audiences; loading them all was most of an
        evaluation's time)."""
        return frozenset(
            audiences_referred_to(
                [s for definition in self.definitions.values() for s in definition.segments]
                + [s for trigger in triggers for s in trigger.segments]
            )
        )

    def affected(self, changed: Iterable[str] | None) -> frozenset[str]:
        """The plan's audiences an identify that set these top-level properties may move the user
        in or out of (None: unknown, such as a new or deleted user: every audience)."""
        if changed is None:
            return frozenset(self.definitions)
        changed = {*changed, EVERY_PROPERTY}
        return frozenset(key for key, names in self.reads.items() if names & changed)

    def subset(self, keys: Iterable[str], table: str) -> Plan:
        """The plan of only these audiences (each with those it refers to already in `keys`, as
        `affected` gives them), compiled by the same compiler; its users' rows go to `table`.
        An audience outside `keys` that one of them refers to is read as a membership."""
        keys = set(keys)
        return _build({k: d for k, d in self.definitions.items() if k in keys}, table)


def compile_plan(
    definitions: Mapping[str, AudienceDefinition],
    evaluated_versions: Mapping[str, str],
    custom_keys: Iterable[str] = (),
) -> Plan:
    """The plan for these definitions: the real-time audiences (`paths`) that the pipeline has
    evaluated at their current version, and their queries, compiled once."""
    reasons = paths(definitions, custom_keys)
    chosen: dict[str, AudienceDefinition] = {}
    known = set(definitions)  # once, not once per audience (quadratic at thousands: issue 25)
    order = TopologicalSorter(
        {key: definition.references() & known for key, definition in definitions.items()}
    )
    for key in order.static_order():
        definition = definitions[key]
        if definition.type != "dynamic" or reasons.get(key) is not None:
            continue
        if evaluated_versions.get(key) != definition.version:
            continue
        references = definition.references()
        if not all(r in chosen or definitions[r].type == "static" for r in references):
            continue  # it refers to an audience real time leaves to the next run
        chosen[key] = definition
    return _build(chosen)


def _build(chosen: Mapping[str, AudienceDefinition], table: str = "realtime_users") -> Plan:
    """The plan's levels, queries and reads for these audiences, in an order where an audience
    comes after those of them it refers to."""
    depth: dict[str, int] = {}
    reads: dict[str, frozenset[str]] = {}
    order = TopologicalSorter({key: d.references() & set(chosen) for key, d in chosen.items()})
    for key in order.static_order():
        references = chosen[key].references() & set(chosen)
        depth[key] = 1 + max((depth[r] for r in references), default=-1)
        names = {
            attribute.path[0] if attribute.path else EVERY_PROPERTY
            for attribute in attributes_used(chosen[key].segments)
        }
        reads[key] = frozenset(names.union(*(reads[r] for r in references)))
    levels = tuple(
        tuple(sorted(key for key in chosen if depth[key] == level))
        for level in range(1 + max(depth.values(), default=-1))
    )
    attributes = sorted(
        attributes_used(segment for d in chosen.values() for segment in d.segments),
        key=lambda attribute: attribute.column_name,
    )
    return Plan(
        dict(chosen),
        levels,
        _flatten_query(attributes),
        tuple(_level_query(chosen, level, table) for level in levels),
        reads,
        table,
    )


def _flatten_query(attributes: list[Attribute]) -> str:
    """The user's attributes, one typed column each, with "now" beside them."""
    users = exp.to_table("raw.users").as_("users")
    properties = exp.column("properties", table="users")
    identifier = exp.column("user_id", table="users")
    columns = [
        exp.alias_(
            attribute_expression(property_json(a.path, properties, identifier), a.variant),
            a.column_name,
            quoted=True,
        )
        for a in attributes
    ]
    return render(
        exp.select("users.user_key", "users.user_id", "clock.evaluated_at", *columns)
        .from_(users)
        .join(exp.to_table("main.realtime_clock").as_("clock"), join_type="cross")
        .where(exp.column("deleted_at", table="users").is_(exp.null())),
        pretty=False,
    )


def _level_query(
    definitions: Mapping[str, AudienceDefinition], keys: tuple[str, ...], table: str
) -> str:
    def members_of(key: str) -> exp.Expression:
        return (
            exp.select("user_key")
            .from_("main.audience_members")
            .where(
                exp.and_(exp.column("audience_key").eq(exp.Literal.string(key)), without_tenant())
            )
        )

    context = CompileContext(
        attribute=lambda a: exp.column(a.column_name, table="users", quoted=True),
        audience_members=members_of,
        evaluation_time=exp.column("evaluated_at", table="users"),
        user_key=exp.column("user_key", table="users"),
        user_id=exp.column("user_id", table="users"),
    )
    verdicts = [
        exp.alias_(compile_segments(definitions[key].segments, context), f"v{index}")
        for index, key in enumerate(keys)
    ]
    return render(
        exp.select("users.user_id", "users.user_key", *verdicts).from_(
            exp.table_(table, db="main", quoted=True).as_("users")
        ),
        pretty=False,
    )


class UserEvaluator:
    """An in-memory DuckDB holding some users at a time as the store knows them (properties and
    memberships), opened once and reused. Each plan's statements are prepared once, the
    `PREPARED_PLANS` most recently used kept: planning a query costs far more than running it on
    a few users. The callers serialize on `lock`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connection = duckdb.connect(":memory:")
        self.connection.execute("set TimeZone = 'UTC'")
        # A few users per statement: one thread runs each at once, where DuckDB's pool of one per
        # core cost more in handing out tasks than it saved (a fast-lane evaluation 8.0 -> 7.0 ms
        # of wall, 5.6 -> 4.9 ms of CPU; a whole-plan one about a quarter less).
        self.connection.execute("set threads = 1")
        ensure_user_tables(self.connection)
        self.connection.execute(AUDIENCE_MEMBERS_STAND_IN)
        self.connection.execute("create table main.realtime_clock (evaluated_at timestamptz)")
        self._holds_memberships = False  # whether main.audience_members has rows to delete
        # plan -> its generation (the suffix of its statements), most recently used last
        self._prepared: dict[int, tuple[Plan, int]] = {}
        self._generation = 0
        # (plan, audiences) -> (plan, its subset), most recently used last
        self._subsets: dict[tuple[int, frozenset[str]], tuple[Plan, Plan]] = {}

    def subset(self, plan: Plan, keys: frozenset[str]) -> Plan:
        """`plan.subset(keys)`, compiled once per plan and set of audiences (the whole plan when
        `keys` are all of them)."""
        if keys == plan.keys:
            return plan
        cache_key = (id(plan), keys)
        found = self._subsets.pop(cache_key, None)
        if found is None or found[0] is not plan:
            self._generation += 1
            found = (plan, plan.subset(keys, f"realtime_users_{self._generation}"))
        self._subsets[cache_key] = found
        while len(self._subsets) > PREPARED_PLANS:
            self._subsets.pop(next(iter(self._subsets)))
        return found[1]

    def load(
        self,
        users: Iterable[tuple[str, dict | None, Iterable[tuple[str, str | None]]]],
        now: datetime,
        audiences: Iterable[str] | None = None,
    ) -> None:
        """Hold these users, each (user id, properties or None when deleted or unknown, memberships
        [(audience, tenant)]), at `now`; of their memberships, only those of `audiences` when
        given (what the conditions to evaluate read: `Plan.memberships_read`)."""
        connection = self.connection
        tables = ["raw.users", "main.realtime_clock"]
        if self._holds_memberships:
            tables.append("main.audience_members")
        for table in tables:
            connection.execute(f"delete from {table}")
        self._holds_memberships = False
        connection.execute("insert into main.realtime_clock values ($now)", {"now": now})
        wanted = None if audiences is None else set(audiences)
        users, rows, members = list(users), [], []
        for key, (user_id, properties, memberships) in enumerate(users, start=1):
            if properties is not None:
                rows.append((key, user_id, json.dumps(properties), now, now))
            members += [
                (audience, key, user_id, tenant)
                for audience, tenant in memberships
                if wanted is None or audience in wanted
            ]
        # One statement per table (executemany runs one per row).
        if rows:
            connection.execute(
                "insert into raw.users values "
                + ", ".join(["(?, ?, ?::json, 'store', ?, ?, null)"] * len(rows)),
                [value for row in rows for value in row],
            )
        if members:
            connection.execute(
                "insert into main.audience_members values "
                + ", ".join(["(?, ?, ?, ?)"] * len(members)),
                [value for row in members for value in row],
            )
            self._holds_memberships = True

    def _prepare(self, plan: Plan) -> int:
        """Prepare the plan's statements (once per plan, while it is among the most recently
        used)."""
        found = self._prepared.pop(id(plan), None)
        if found is not None and found[0] is plan:
            self._prepared[id(plan)] = found
            return found[1]
        self._generation += 1
        generation, connection = self._generation, self.connection
        table = f"main.{_quoted(plan.table)}"
        connection.execute(f"create or replace table {table} as {plan.flatten} limit 0")
        connection.execute(f"prepare flatten_{generation} as insert into {table} {plan.flatten}")
        for index, query in enumerate(plan.queries):
            connection.execute(f"prepare level_{generation}_{index} as {query}")
        self._prepared[id(plan)] = (plan, generation)
        while len(self._prepared) > PREPARED_PLANS:
            old_plan, old = self._prepared.pop(next(iter(self._prepared)))
            connection.execute(f"deallocate flatten_{old}")
            for index in range(len(old_plan.queries)):
                connection.execute(f"deallocate level_{old}_{index}")
            if all(kept.table != old_plan.table for kept, _ in self._prepared.values()):
                connection.execute(f"drop table if exists main.{_quoted(old_plan.table)}")
        return generation

    def evaluate(self, plan: Plan) -> dict[str, set[str]]:
        """Per loaded user id: the plan's audiences they are a member of (with no tenant). One
        query per level for every loaded user: a query's cost is mostly fixed, not per user."""
        if not plan.levels:
            return {}
        generation = self._prepare(plan)
        connection = self.connection
        connection.execute(f"delete from main.{_quoted(plan.table)}")
        connection.execute(f"execute flatten_{generation}")
        members: dict[str, set[str]] = {}
        for index, keys in enumerate(plan.levels):
            result = connection.execute(f"execute level_{generation}_{index}").fetchall()
            entered = []
            for user_id, user_key, *verdicts in result:
                now_in = {key for key, verdict in zip(keys, verdicts, strict=True) if verdict}
                members.setdefault(user_id, set()).update(now_in)
                entered += [(key, user_key, user_id) for key in sorted(now_in)]
            if index + 1 == len(plan.levels):
                break
            # Later levels read this level's verdicts as memberships. One statement each (an
            # `executemany` runs one per row, each bound and planned: most of a full evaluation).
            connection.execute(
                "delete from main.audience_members where tenant is null and audience_key in ("
                + ", ".join(["?"] * len(keys))
                + ")",
                list(keys),
            )
            if entered:
                connection.execute(
                    "insert into main.audience_members values "
                    + ", ".join(["(?, ?, ?, null)"] * len(entered)),
                    [value for row in entered for value in row],
                )
                self._holds_memberships = True
        return members

    def close(self) -> None:
        self.connection.close()


def _quoted(name: str) -> str:
    return exp.to_identifier(name, quoted=True).sql(DIALECT)


def event_id(
    audience_key: str, user_id: str, tenant: str | None, event_type: str, entry: int
) -> str:
    """The event's deterministic id, as the pipeline's diff computes it in SQL."""
    text = "\x1f".join((audience_key, user_id, tenant or "", event_type, str(entry)))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class Decisions:
    """What an evaluation of some users decided: their events, and the rows that record them."""

    events: list[MembershipEvent] = field(default_factory=list)
    event_rows: list[dict] = field(default_factory=list)
    realtime_rows: list[dict] = field(default_factory=list)
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


def decide(
    store: MembershipStore,
    user_ids: Iterable[str],
    plan: Plan,
    evaluator: UserEvaluator,
    now: datetime | None = None,
    triggers: Iterable[WorkflowTrigger] | None = None,
) -> Decisions:
    """Evaluate these users' real-time audiences over the store's copy of them (read outside any
    write, so the store's write lock is not held meanwhile); each difference from the store's
    current membership is an event with the pipeline's id. The caller holds `evaluator.lock`
    until `record` has run (trigger conditions read the users the evaluator holds: with
    `triggers`, the evaluator holds only the memberships that the plan and these triggers read;
    without, all of them)."""
    decisions = Decisions(now=now or datetime.now(UTC))
    user_ids = sorted(set(user_ids))
    if not user_ids or not plan.definitions:
        return decisions
    stamp = decisions.now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with store.read_engine.connect() as connection:
        state = _read_state(store, connection, user_ids, plan)
    # Never identified through the store (no patch): the pipeline's users only.
    known = [user_id for user_id in user_ids if state[user_id][3] is not None]
    evaluator.load(
        [(u, state[u][0], state[u][1]) for u in known],
        decisions.now,
        None if triggers is None else plan.memberships_read(triggers),
    )
    verdicts = evaluator.evaluate(plan)
    for user_id in known:
        _, memberships, entries, patch_id = state[user_id]
        members = verdicts.get(user_id, set())
        current = {key for key, tenant in memberships if tenant is None}
        for key in sorted(plan.keys):
            if (key in members) == (key in current):
                continue
            kind = "entered" if key in members else "exited"
            last = entries.get(key, 0)
            entry = last + 1 if kind == "entered" else max(last, 1)
            event = MembershipEvent(
                event_id=event_id(key, user_id, None, kind, entry),
                audience_key=key,
                user_id=user_id,
                tenant=None,
                event_type=kind,
                occurred_at=stamp,
                entry_number=entry,
                audience_version=plan.definitions[key].version,
            )
            decisions.events.append(event)
            decisions.event_rows.append({**event.as_row(), "published_at": stamp, "source": SOURCE})
            decisions.realtime_rows.append(
                {
                    "event_id": event.event_id,
                    "audience_key": key,
                    "user_id": user_id,
                    "event_type": kind,
                    "entry_number": entry,
                    "occurred_at": stamp,
                    "patch_id": patch_id,
                    "imported_at": None,
                }
            )
    return decisions


def record(
    store: MembershipStore,
    connection,
    decisions: Decisions,
    evaluator: UserEvaluator,
    triggers: Mapping[str, WorkflowTrigger],
    default_sink: str,
) -> PublishReport:
    """Record decided events inside the caller's store transaction: the events (source
    `realtime`, inserted ignoring those already there), the current membership,
    `realtime_events` and the deliveries of their triggers. Idempotent."""
    if not decisions.events:
        return PublishReport()
    if os.environ.get(FAULT_POINT) == FAULT_BEFORE_EVENTS:
        # The whole service: in `audiences serve`'s worker process, the API's process too.
        if os.environ.get(FAULT_ALSO_KILLS):
            os.kill(int(os.environ[FAULT_ALSO_KILLS]), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    report = queue_event_deliveries(
        evaluator.connection,
        store,
        connection,
        decisions.events,
        dict(triggers),
        default_sink,
        decisions.now,
    )
    store.insert_ignoring_duplicates(connection, tables.membership_events, decisions.event_rows)
    store.insert_ignoring_duplicates(connection, tables.realtime_events, decisions.realtime_rows)
    apply_membership_changes(store, connection, decisions.events)
    return report


def _read_state(store: MembershipStore, connection, user_ids: list[str], plan: Plan) -> dict:
    """Per user: (properties or None, memberships [(audience, tenant)], last entry number per plan
    audience with no tenant, newest identify patch id or None)."""
    profiles, members = tables.user_profiles, tables.audience_members
    events, patches = tables.membership_events, tables.user_patches
    state: dict[str, tuple] = {}
    for start in range(0, len(user_ids), 500):
        chunk = user_ids[start : start + 500]
        found = {
            row.user_id: (None if row.deleted_at else json.loads(row.properties))
            for row in connection.execute(
                sa.select(profiles.c.user_id, profiles.c.properties, profiles.c.deleted_at).where(
                    profiles.c.user_id.in_(chunk)
                )
            )
        }
        memberships: dict[str, list] = {}
        for row in connection.execute(
            sa.select(members.c.user_id, members.c.audience_key, members.c.tenant).where(
                members.c.user_id.in_(chunk)
            )
        ):
            memberships.setdefault(row.user_id, []).append((row.audience_key, row.tenant))
        entries: dict[str, dict[str, int]] = {}
        for row in connection.execute(
            sa.select(events.c.user_id, events.c.audience_key, sa.func.max(events.c.entry_number))
            .where(
                events.c.user_id.in_(chunk),
                events.c.audience_key.in_(sorted(plan.keys)),
                events.c.tenant.is_(None),
            )
            .group_by(events.c.user_id, events.c.audience_key)
        ):
            entries.setdefault(row[0], {})[row[1]] = row[2]
        newest = {
            row[0]: row[1]
            for row in connection.execute(
                sa.select(patches.c.user_id, sa.func.max(patches.c.patch_id))
                .where(patches.c.user_id.in_(chunk))
                .group_by(patches.c.user_id)
            )
        }
        for user_id in chunk:
            state[user_id] = (
                found.get(user_id),
                memberships.get(user_id, []),
                entries.get(user_id, {}),
                newest.get(user_id),
            )
    return state


def read_plan(store: MembershipStore) -> dict[str, str]:
    """The pipeline's plan: {audience key: version} of the dynamic audiences it has evaluated."""
    markers = tables.store_markers
    value = store.scalar(sa.select(markers.c.value).where(markers.c.name == PLAN_MARKER))
    return json.loads(value) if value else {}


def publish_plan(store: MembershipStore, warehouse: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Tell real time which dynamic audiences the pipeline has evaluated, at which version: those
    of the catalog (not skipped) whose first members are recorded. Run after publishing."""
    rows = warehouse.execute(
        """
        select audience_key, audience_version from main.audience_catalog
        where audience_type = 'dynamic' and not is_skipped
            and audience_key in (select audience_key from raw.membership_audiences)
        order by audience_key
        """
    ).fetchall()
    plan = {key: version for key, version in rows}
    markers = tables.store_markers
    with store.engine.begin() as connection:
        connection.execute(markers.delete().where(markers.c.name == PLAN_MARKER))
        connection.execute(
            markers.insert().values(name=PLAN_MARKER, value=json.dumps(plan, sort_keys=True))
        )
    return plan


def waiting_users(store: MembershipStore) -> list[str]:
    """Users whose identify patches the pipeline has not loaded yet: those a restarted API
    evaluates again, in case it died before recording their events."""
    patches = tables.user_patches
    return [
        row["user_id"]
        for row in store.rows(
            sa.select(patches.c.user_id).where(patches.c.loaded == sa.false()).distinct()
        )
    ]


def import_realtime_events(
    warehouse: duckdb.DuckDBPyConnection, store: MembershipStore, evaluated_at: datetime
) -> int:
    """Before the diff: apply to the warehouse's membership history (`raw.membership_intervals`)
    the real-time events whose identify patch the warehouse has loaded, in order, so the diff
    starts from the memberships real time left and finds nothing to repeat. Idempotent (an entry
    already open, or an exit already closed, is left). An event's time is kept, or the
    evaluation's when it is later (history only moves forward). Remembered in
    `raw.realtime_imports` with this evaluation's time, for `realtime_disagreements`."""
    from audiences.warehouse.schema import ensure_membership_tables

    ensure_membership_tables(warehouse)
    events, patches = tables.realtime_events, tables.user_patches
    # The version real time evaluated is its membership event's: each interval names it.
    recorded = tables.membership_events
    rows = store.rows(
        sa.select(events, recorded.c.audience_version)
        .select_from(events.outerjoin(recorded, recorded.c.event_id == events.c.event_id))
        .where(
            events.c.imported_at.is_(None),
            events.c.patch_id.in_(
                sa.select(patches.c.patch_id).where(patches.c.loaded == sa.true())
            ),
        )
        .order_by(
            events.c.audience_key, events.c.user_id, events.c.entry_number, events.c.event_type
        )
    )
    warehouse.execute(
        """
        create table if not exists raw.realtime_imports (
            event_id varchar primary key, audience_key varchar, user_id varchar,
            event_type varchar, entry_number integer, occurred_at timestamptz,
            imported_for timestamptz
        )
        """
    )
    if not rows:
        return 0
    # The events are applied one after another, as they happened, but to a working copy of the
    # intervals of the (audience, user) pairs they touch (one scan of the history and one of the
    # users, not one of each per event: at 1M users and 7M intervals that was minutes for a
    # minute of real time), which then replaces those pairs' intervals.
    warehouse.execute("begin transaction")
    try:
        warehouse.execute(
            """
            create or replace temp table realtime_import_rows as
            select
                cast(unnest($seq) as integer) as seq,
                cast(unnest($ids) as varchar) as event_id,
                cast(unnest($keys) as varchar) as audience_key,
                cast(unnest($users) as varchar) as user_id,
                cast(unnest($types) as varchar) as event_type,
                cast(unnest($entries) as integer) as entry_number,
                cast(unnest($ats) as timestamptz) as at,
                cast(unnest($occurred) as varchar) as occurred_at,
                cast(unnest($versions) as varchar) as audience_version
            """,
            {
                "seq": list(range(len(rows))),
                "ids": [row["event_id"] for row in rows],
                "keys": [row["audience_key"] for row in rows],
                "users": [row["user_id"] for row in rows],
                "types": [row["event_type"] for row in rows],
                "entries": [row["entry_number"] for row in rows],
                # an event's time, or the evaluation's when it is later
                "ats": [
                    min(
                        datetime.fromisoformat(row["occurred_at"].replace("Z", "+00:00")),
                        evaluated_at,
                    )
                    for row in rows
                ],
                "occurred": [row["occurred_at"] for row in rows],
                "versions": [row["audience_version"] for row in rows],
            },
        )
        # The events of users the warehouse holds, with their keys (an event of another user
        # changes no interval; it is still remembered below).
        warehouse.execute(
            """
            create or replace temp table realtime_import_keyed as
            select imported.seq, imported.audience_key, users.user_key, users.user_id,
                imported.event_type, imported.entry_number, imported.at,
                imported.audience_version
            from realtime_import_rows as imported
            join raw.users as users on users.user_id = imported.user_id
            """
        )
        warehouse.execute(
            """
            create or replace temp table realtime_import_intervals as
            select intervals.*
            from raw.membership_intervals as intervals
            where intervals.tenant is null and exists (
                select 1
                from realtime_import_keyed as keyed
                where keyed.audience_key = intervals.audience_key
                    and keyed.user_key = intervals.user_key
            )
            """
        )
        keyed = warehouse.execute(
            """
            select keyed.audience_key, keyed.user_key, keyed.user_id, keyed.event_type,
                keyed.entry_number, keyed.at, keyed.audience_version
            from realtime_import_keyed as keyed
            order by keyed.seq
            """
        ).fetchall()
        for audience, user_key, user_id, event_type, entry, at, version in keyed:
            # entered before exited of the same entry: 'entered' < 'exited' (the rows' order)
            parameters = {"a": audience, "k": user_key, "n": entry, "at": at}
            if event_type == "entered":
                warehouse.execute(
                    """
                    insert into realtime_import_intervals
                    select $a, $k, $u, null, $n, $at, null, $v
                    where not exists (
                        select 1 from realtime_import_intervals as i
                        where i.audience_key = $a and i.user_key = $k
                            and (i.entry_number = $n or i.exited_at is null)
                    )
                    """,
                    {**parameters, "u": user_id, "v": version},
                )
            else:
                warehouse.execute(
                    """
                    update realtime_import_intervals set exited_at = $at
                    where audience_key = $a and user_key = $k and entry_number = $n
                        and exited_at is null
                    """,
                    parameters,
                )
        warehouse.execute(
            """
            delete from raw.membership_intervals as intervals
            where intervals.tenant is null and exists (
                select 1 from realtime_import_intervals as kept
                where kept.audience_key = intervals.audience_key
                    and kept.user_key = intervals.user_key
            )
            """
        )
        warehouse.execute(
            "insert into raw.membership_intervals select * from realtime_import_intervals"
        )
        warehouse.execute(
            """
            insert or ignore into raw.realtime_imports
            select event_id, audience_key, user_id, event_type, entry_number,
                cast(occurred_at as timestamptz), $e
            from realtime_import_rows
            order by seq
            """,
            {"e": evaluated_at},
        )
        warehouse.execute("drop table realtime_import_rows")
        warehouse.execute("drop table realtime_import_keyed")
        warehouse.execute("drop table realtime_import_intervals")
        warehouse.execute("commit")
    except BaseException:
        warehouse.execute("rollback")
        raise
    # After the warehouse committed: a crash in between imports them again, which changes nothing.
    stamp = now_text()
    ids = [row["event_id"] for row in rows]
    with store.engine.begin() as connection:
        for start in range(0, len(ids), 500):
            connection.execute(
                events.update()
                .where(events.c.event_id.in_(ids[start : start + 500]))
                .values(imported_at=stamp)
            )
    return len(rows)


def realtime_disagreements(
    warehouse: duckdb.DuckDBPyConnection, evaluated_at: datetime
) -> list[dict]:
    """The diff's events at `evaluated_at` on a membership that a real-time event imported for
    this evaluation had set: the batch evaluation disagreed with real time (it wins: its event is
    the correction). Each is a defect to investigate."""
    found = warehouse.execute(
        "select count(*) from information_schema.tables where table_schema = 'raw' "
        "and table_name = 'realtime_imports'"
    ).fetchall()[0][0]
    if not found:
        return []
    rows = warehouse.execute(
        """
        select outbox.audience_key, outbox.user_id, outbox.event_type, outbox.entry_number,
               imports.event_type as realtime_event, imports.entry_number as realtime_entry
        from raw.membership_outbox as outbox
        join raw.realtime_imports as imports
            on imports.audience_key = outbox.audience_key and imports.user_id = outbox.user_id
        where outbox.occurred_at = $at and imports.imported_for = $at and outbox.tenant is null
        qualify row_number() over (
            partition by outbox.event_id order by imports.entry_number desc, imports.event_type desc
        ) = 1
        order by outbox.audience_key, outbox.user_id
        """,
        {"at": evaluated_at},
    ).fetchall()
    names = (
        "audience_key",
        "user_id",
        "event_type",
        "entry_number",
        "realtime_event",
        "realtime_entry",
    )
    return [dict(zip(names, row, strict=True)) for row in rows]
