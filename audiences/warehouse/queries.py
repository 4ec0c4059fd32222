"""Reading audiences out of the DuckDB warehouse: preview, members, explain.

These answer questions without running dbt (which costs seconds to start): `preview` compiles a
definition and counts matching users right now, writing nothing; `members` lists the last
evaluation's members; `explain` shows, condition by condition, the value seen and the verdict for
one user. All of them compile conditions with the one compiler, reading attributes from the
`int_users_flattened` table when it is fresh and has them, and straight from the users' JSON
otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import duckdb
from sqlglot import exp

from audiences.conditions.compiler import (
    EXTENSION_OPERATORS,
    RECIPIENT,
    Attribute,
    AudienceTenancy,
    CompileContext,
    Condition,
    attribute_expression,
    attributes_used,
    compile_condition,
    compile_segments,
    event_summary,
    normalized_tenant,
    pair_attribute,
    property_json,
    render,
    timestamp_literal,
    without_tenant,
)
from audiences.conditions.definitions import AudienceDefinition
from audiences.dbt.models import FLATTENED_MODEL
from audiences.warehouse.lock import hold_reader_lock

MEMBERS_TABLE = "main.audience_members"
FLATTENED_TABLE = f"main.{FLATTENED_MODEL}"


class WarehouseError(RuntimeError):
    """The warehouse cannot answer (missing file, never evaluated, locked by a running job)."""


def connect(path: Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the DuckDB warehouse with the session settings every engine query assumes (UTC)."""
    path = Path(path)
    if read_only and not path.exists():
        raise WarehouseError(f"{path}: no warehouse yet; run `audiences run` first")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        connection = duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as error:
        raise WarehouseError(
            f"{path}: cannot open the warehouse ({error}); is a pipeline run writing it?"
        ) from None
    connection.execute("set TimeZone = 'UTC'")
    connection.execute(
        "set memory_limit = $limit",
        {"limit": os.environ.get("AUDIENCES_DUCKDB_MEMORY_LIMIT", "1500MB")},
    )
    return connection


@contextlib.contextmanager
def reading(
    path: Path, report: Callable[[str], None] | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to the warehouse that no run writes while it is open: a run writing
    it now is waited for (`report` names it), and a run that starts meanwhile waits for this one
    (`audiences/warehouse/lock.py`). Outside a run, read the warehouse through this, not `connect`:
    DuckDB refuses a writer the file while any reader has it open."""
    with hold_reader_lock(Path(path), report), connect(path, read_only=True) as connection:
        yield connection


def table_exists(connection: duckdb.DuckDBPyConnection, qualified: str) -> bool:
    schema, name = qualified.split(".")
    return bool(
        connection.execute(
            "select count(*) from information_schema.tables where table_schema = $schema and table_name = $name",
            {"schema": schema, "name": name},
        ).fetchall()[0][0]
    )


def _columns(connection, qualified: str) -> set[str]:
    schema, name = qualified.split(".")
    rows = connection.execute(
        "select column_name from information_schema.columns where table_schema = $schema and table_name = $name",
        {"schema": schema, "name": name},
    ).fetchall()
    return {row[0] for row in rows}


@dataclass
class _Query:
    """The FROM clause and compile context for evaluating conditions over users."""

    source: exp.Expression
    context: CompileContext


def _users_query(
    connection,
    segments,
    definitions: dict[str, AudienceDefinition],
    now: datetime,
    user_filter: exp.Expression | None = None,
    replaced: dict[str, exp.Expression] | None = None,
) -> _Query:
    """Users to evaluate conditions over: all current users, or those `user_filter` (a condition on
    `users.user_id`) keeps, in which case attributes are read inline (a few users, no table scan).
    `replaced` gives, for some audience keys, the query of their members (`user_key`, `tenant`,
    as `audience_members` holds them) that `is_audience_member` reads instead of the last
    evaluation's (a dry run's new members)."""
    needed = attributes_used(segments)
    fresh = (
        table_exists(connection, FLATTENED_TABLE)
        and user_filter is None
        and _is_fresh(connection)
        and {attribute.column_name for attribute in needed} <= _columns(connection, FLATTENED_TABLE)
    )
    now_sql = timestamp_literal(now)
    evaluated = table_exists(connection, MEMBERS_TABLE)

    def members_of(key: str) -> exp.Expression:
        if replaced and key in replaced:
            return (
                exp.select("user_key")
                .from_(replaced[key].copy().subquery("replaced"))
                .where(without_tenant())
            )
        if evaluated:
            return (
                exp.select("user_key")
                .from_(MEMBERS_TABLE)
                .where(
                    exp.and_(
                        exp.column("audience_key").eq(exp.Literal.string(key)), without_tenant()
                    )
                )
            )
        if key not in definitions:
            raise WarehouseError(
                f"audience {key!r} has never been evaluated; run `audiences run` first"
            )
        referenced = definitions[key]
        inner = _users_query(connection, referenced.segments, definitions, now, replaced=replaced)
        if not referenced.per_tenant:
            return (
                exp.select("user_key")
                .from_(inner.source)
                .where(compile_segments(referenced.segments, inner.context))
            )
        # A per-tenant audience is evaluated per tenant, over its pairs, and read tenant-strict
        # as the warehouse reads its members (`without_tenant`): every pair has a tenant.
        inner = _pairs(connection, inner)
        return (
            exp.select("user_key")
            .from_(inner.source)
            .where(
                exp.and_(
                    compile_segments(referenced.segments, inner.context),
                    without_tenant(exp.column("tenant", table="users")),
                )
            )
        )

    def pairs_of(key: str) -> exp.Expression:
        # (user_key, tenant) of the members, for a per-tenant pair (`reads_pair_membership`).
        if replaced and key in replaced:
            return exp.select("user_key", "tenant").from_(replaced[key].copy().subquery("replaced"))
        if evaluated:
            return (
                exp.select("user_key", exp.alias_(normalized_tenant(), "tenant", quoted=False))
                .from_(MEMBERS_TABLE)
                .where(exp.column("audience_key").eq(exp.Literal.string(key)))
            )
        if key in definitions and definitions[key].per_tenant:
            referenced = definitions[key]
            inner = _pairs(
                connection, _users_query(connection, referenced.segments, definitions, now)
            )
            return (
                exp.select("users.user_key", "users.tenant")
                .from_(inner.source)
                .where(compile_segments(referenced.segments, inner.context))
            )
        # Not evaluated yet: none of its members has a tenant.
        return exp.select(
            "user_key", exp.alias_(exp.cast(exp.null(), "varchar"), "tenant", quoted=False)
        ).from_(exp.paren(members_of(key)).as_("members"))

    def tenancy_of(key: str) -> AudienceTenancy:
        if key not in definitions:
            return AudienceTenancy(None)  # a hand-written SQL audience
        return AudienceTenancy(definitions[key].type, definitions[key].per_tenant)

    if fresh:
        source = exp.to_table(FLATTENED_TABLE).as_("users")
        context = CompileContext(
            attribute=lambda a: a.column(table="users"),
            audience_members=members_of,
            evaluation_time=now_sql,
            user_key=exp.column("user_key", table="users"),
            user_id=exp.column("user_id", table="users"),
            audience_pairs=pairs_of,
            audience_tenancy=tenancy_of,
        )
        return _Query(source, context)
    properties, identifier = (
        exp.column("properties", table="users"),
        exp.column("user_id", table="users"),
    )
    where = exp.column("deleted_at", table="users").is_(exp.null())
    if user_filter is not None:
        where = exp.and_(where, user_filter)
    source = (
        exp.select("*").from_(exp.to_table("raw.users").as_("users")).where(where).subquery("users")
    )
    context = CompileContext(
        attribute=lambda a: attribute_expression(
            property_json(a.path, properties, identifier), a.variant
        ),
        audience_members=members_of,
        evaluation_time=now_sql,
        user_key=exp.column("user_key", table="users"),
        user_id=identifier,
        audience_pairs=pairs_of,
        audience_tenancy=tenancy_of,
    )
    return _Query(source, context)


def _pairs(connection, query: _Query, tenant: str | None = None) -> _Query:
    """A per-tenant audience's (user, tenant) pairs over the users of `query`, aliased `users` as
    they were (audiences/dbt/tenants.py builds the same pairs for dbt): the tenant memberships
    whose user and tenant exist, with `tenant`, `tenant_properties` and `membership_properties`,
    which `tenant.*` and `membership.*` read. Only the pairs of `tenant` when one is given."""
    if not (
        table_exists(connection, "raw.tenants")
        and table_exists(connection, "raw.tenant_memberships")
    ):
        raise WarehouseError(
            "no tenants or tenant memberships are loaded: declare `tenants:` and "
            "`tenant_memberships:` in sources.yml, then `audiences run`"
        )
    memberships = (
        exp.select("user_id", "tenant_id", "properties")
        .from_("raw.tenant_memberships")
        .where("deleted_at is null")
        .subquery("memberships")
    )
    tenants = (
        exp.select("tenant_id", "properties")
        .from_("raw.tenants")
        .where("deleted_at is null")
        .subquery("tenants")
    )
    pairs = (
        exp.select(
            "users.*",
            "memberships.tenant_id as tenant",
            "tenants.properties as tenant_properties",
            "memberships.properties as membership_properties",
        )
        .from_(query.source)
        .join(memberships, on="memberships.user_id = users.user_id", join_type="inner")
        .join(tenants, on="tenants.tenant_id = memberships.tenant_id", join_type="inner")
    )
    if tenant is not None:
        pairs = pairs.where(
            exp.column("tenant_id", table="memberships").eq(exp.Literal.string(tenant))
        )
    context = replace(
        query.context,
        pair_attribute=pair_attribute,
        pair_tenant=exp.column("tenant", table="users"),
    )
    return _Query(pairs.subquery("users"), context)


def _is_fresh(connection) -> bool:
    """True when no user changed after the flattened attributes were last built."""
    return connection.execute(
        f"select count(*) = 0 from raw.users where updated_at > (select max(updated_at) from {FLATTENED_TABLE})"
    ).fetchall()[0][0]


@dataclass(frozen=True)
class Preview:
    count: int
    total_users: int
    sample: list[dict]
    evaluated_at: datetime
    sql: str


def preview(
    connection: duckdb.DuckDBPyConnection,
    definition: AudienceDefinition,
    definitions: dict[str, AudienceDefinition],
    now: datetime,
    sample_size: int = 10,
    tenant: str | None = None,
) -> Preview:
    """Count and sample the users matching a definition now, against the current warehouse.
    A per-tenant audience counts (user, tenant) pairs (only `tenant`'s, if given), and each
    sampled row names its tenant."""
    if definition.type != "dynamic":
        raise WarehouseError(
            f"{definition.key!r} is a static audience: its members are added, not matched"
        )
    if tenant is not None and not definition.per_tenant:
        raise WarehouseError(
            f'{definition.key!r} is not per tenant (no "tenancy": "per_tenant"): '
            "its members have no tenant, so --tenant does not apply"
        )
    _require_users(connection)
    query = _users_query(connection, definition.segments, definitions, now)
    tenant_column = exp.cast(exp.null(), "varchar").as_("tenant")
    if definition.per_tenant:
        query = _pairs(connection, query, tenant)
        tenant_column = exp.column("tenant", table="users")
    condition = compile_segments(definition.segments, query.context)
    matching = (
        exp.select("users.user_key", "users.user_id", tenant_column)
        .from_(query.source)
        .where(condition)
    )
    sql = render(matching)
    count = connection.execute(f"select count(*) from ({sql})").fetchall()[0][0]
    sampled = connection.execute(
        f"""
        select matching.user_id, users.properties, matching.tenant
        from ({sql}) as matching
        join raw.users as users using (user_key)
        order by matching.user_id, matching.tenant
        limit {int(sample_size)}
        """
    ).fetchall()
    total = connection.execute(
        f"select count(*) from {render(query.source, pretty=False)}"
        if definition.per_tenant  # of the pairs (in the tenant, if given)
        else "select count(*) from raw.users where deleted_at is null"
    ).fetchall()[0][0]
    sample = [
        {
            "user_id": user_id,
            **({"tenant": tenant_id} if definition.per_tenant else {}),
            **_summary(json.loads(properties)),
        }
        for user_id, properties, tenant_id in sampled
    ]
    return Preview(count, total, sample, now, sql)


def matching_users_sql(
    connection: duckdb.DuckDBPyConnection,
    definition: AudienceDefinition,
    definitions: dict[str, AudienceDefinition],
    now: datetime,
) -> str:
    """The SQL (`user_key`, `user_id`) of the current users a dynamic definition matches now,
    compiled as `preview` compiles it: over the flattened attributes when they are fresh and hold
    every property it reads, else over `raw.users`. A per-tenant audience's users are those with
    at least one matching (user, tenant) pair, each once."""
    _require_users(connection)
    query = _users_query(connection, definition.segments, definitions, now)
    if definition.per_tenant:
        query = _pairs(connection, query)
    condition = compile_segments(definition.segments, query.context)
    selected = exp.select("users.user_key", "users.user_id").from_(query.source).where(condition)
    return render(selected.distinct() if definition.per_tenant else selected)


def matching_scan(
    connection: duckdb.DuckDBPyConnection,
    chosen: list[AudienceDefinition],
    definitions: dict[str, AudienceDefinition],
    now: datetime,
    replaced: dict[str, exp.Expression] | None = None,
) -> tuple[str, list[str]]:
    """Many dynamic definitions over the same users (not per tenant): the SQL of the relation of
    current users (aliased `users`, with `user_key` and `user_id`: the flattened attributes when
    they are fresh and hold every property the definitions read, else `raw.users`) and, per
    definition, the SQL of its condition over it, compiled by the one compiler as `preview`
    compiles it. `replaced`: as for `members_query`."""
    _require_users(connection)
    segments = tuple(segment for definition in chosen for segment in definition.segments)
    query = _users_query(connection, segments, definitions, now, replaced=replaced)
    conditions = [
        render(compile_segments(definition.segments, query.context), pretty=False)
        for definition in chosen
    ]
    return render(query.source, pretty=False), conditions


def members_query(
    connection: duckdb.DuckDBPyConnection,
    definition: AudienceDefinition,
    definitions: dict[str, AudienceDefinition],
    now: datetime,
    replaced: dict[str, exp.Expression] | None = None,
) -> exp.Expression:
    """The query (`user_key`, `tenant`) of the members a dynamic definition would have now, as the
    warehouse records them (`audience_members`): one row per user with no tenant, or one per
    matching (user, tenant) pair of a per-tenant audience. `replaced`: audiences whose members
    `is_audience_member` reads from the given queries (`user_key`, `tenant`) instead of the last
    evaluation's."""
    _require_users(connection)
    query = _users_query(connection, definition.segments, definitions, now, replaced=replaced)
    tenant = exp.cast(exp.null(), "varchar").as_("tenant")
    if definition.per_tenant:
        query = _pairs(connection, query)
        tenant = exp.column("tenant", table="users")
    condition = compile_segments(definition.segments, query.context)
    return exp.select("users.user_key", tenant).from_(query.source).where(condition).distinct()


def _summary(properties: dict) -> dict:
    return {key: properties[key] for key in ("name", "email") if key in properties}


def _require_users(connection) -> None:
    if not table_exists(connection, "raw.users"):
        raise WarehouseError("the warehouse holds no users yet; run `audiences run` first")


def members(connection: duckdb.DuckDBPyConnection, key: str) -> Iterator[dict]:
    """The members of an audience at its last evaluation: `{"user_id", "tenant"}` per member."""
    if not table_exists(connection, MEMBERS_TABLE):
        raise WarehouseError("no evaluation yet; run `audiences run` first")
    known = connection.execute(
        "select count(*) from main.audience_catalog where audience_key = $key", {"key": key}
    ).fetchall()[0][0]
    if not known:
        raise WarehouseError(f"unknown audience {key!r} (not in the last evaluation)")
    cursor = connection.execute(
        f"""
        select users.user_id, members.tenant
        from {MEMBERS_TABLE} as members
        join raw.users as users using (user_key)
        where members.audience_key = $key
        order by users.user_id, members.tenant nulls first
        """,
        {"key": key},
    )
    while batch := cursor.fetchmany(10_000):
        for user_id, tenant in batch:
            yield {"user_id": user_id, "tenant": tenant}


def version_at(
    connection: duckdb.DuckDBPyConnection, audience_key: str, moment: datetime
) -> tuple[str | None, datetime, bool] | None:
    """The definition version in force at `moment`: (version, evaluated_at, still evaluated) of
    the audience's latest evaluation at or before it (`audience_evaluations`), where "still
    evaluated" is false when a later evaluation by then left it out (another audience evaluated
    without it, or its members' exit when it was archived); None when it was never evaluated."""
    if not table_exists(connection, "main.audience_evaluations"):
        return None
    row = connection.execute(
        """
        select audience_version, evaluated_at from main.audience_evaluations
        where audience_key = $key and evaluated_at <= $at
        order by evaluated_at desc limit 1
        """,
        {"key": audience_key, "at": moment},
    ).fetchone()
    if row is None:
        return None
    later = connection.execute(
        "select count(*) from main.audience_evaluations where evaluated_at > $t and evaluated_at <= $at",
        {"t": row[1], "at": moment},
    ).fetchone()[0]
    if not later and table_exists(connection, "raw.membership_intervals"):
        later = connection.execute(
            "select count(*) from raw.membership_intervals where audience_key = $key "
            "and exited_at > $t and exited_at <= $at",
            {"key": audience_key, "t": row[1], "at": moment},
        ).fetchone()[0]
    return row[0], row[1], not later


def last_evaluation(
    connection: duckdb.DuckDBPyConnection, evaluated_at: datetime | None = None
) -> list[dict]:
    """Member counts per audience from the evaluation at `evaluated_at` (default: the latest)."""
    if not table_exists(connection, "main.audience_evaluations"):
        return []
    rows = connection.execute(
        """
        select audience_key, audience_type, member_count, evaluated_at
        from main.audience_evaluations
        where evaluated_at = coalesce($at, (select max(evaluated_at) from main.audience_evaluations))
        order by audience_key
        """,
        {"at": evaluated_at},
    ).fetchall()
    return [
        dict(
            zip(("audience_key", "audience_type", "member_count", "evaluated_at"), row, strict=True)
        )
        for row in rows
    ]


@dataclass(frozen=True)
class ConditionVerdict:
    segment: int
    condition: dict
    value: str
    result: bool


@dataclass(frozen=True)
class Explanation:
    user_id: str
    audience_key: str
    is_member: bool
    segments: list[bool]
    verdicts: list[ConditionVerdict]
    evaluated_at: datetime
    tenant: str | None = None


def explain(
    connection: duckdb.DuckDBPyConnection,
    definition: AudienceDefinition,
    definitions: dict[str, AudienceDefinition],
    user_id: str,
    now: datetime,
    tenant: str | None = None,
) -> Explanation:
    """Why a user is in or out: each condition's value seen and verdict, then each segment's.
    A per-tenant audience is explained for one (user, `tenant`) pair: the tenant is required."""
    from audiences.dbt.models import condition_json

    if definition.type != "dynamic":
        raise WarehouseError(
            f"{definition.key!r} is a static audience: members are added, not matched"
        )
    if definition.per_tenant and tenant is None:
        raise WarehouseError(
            f"{definition.key!r} is per tenant: give the tenant to explain (--tenant)"
        )
    if tenant is not None and not definition.per_tenant:
        raise WarehouseError(
            f'{definition.key!r} is not per tenant (no "tenancy": "per_tenant"): '
            "its members have no tenant, so --tenant does not apply"
        )
    _require_users(connection)
    exists = connection.execute(
        "select count(*) from raw.users where user_id = $id and deleted_at is null", {"id": user_id}
    ).fetchall()[0][0]
    if not exists:
        raise WarehouseError(f"no user {user_id!r} in the warehouse")
    query = _users_query(
        connection,
        definition.segments,
        definitions,
        now,
        user_filter=exp.column("user_id", table="users").eq(exp.Literal.string(user_id)),
    )
    if definition.per_tenant:
        query = _pairs(connection, query, tenant)
        belongs = connection.execute(
            f"select count(*) from {render(query.source, pretty=False)}"
        ).fetchall()[0][0]
        if not belongs:
            raise WarehouseError(
                f"user {user_id!r} does not belong to tenant {tenant!r} (no tenant membership of "
                "both loaded), so the pair is not evaluated"
            )
    selections: list[exp.Expression] = []
    for segment in definition.segments:
        for condition in segment:
            selections.append(_seen_value(condition, query.context))
            selections.append(compile_condition(condition, query.context))
    row = connection.execute(
        render(exp.select(*selections).from_(query.source)) if selections else "select 1"
    ).fetchone()
    verdicts, segments, position = [], [], 0
    for index, segment in enumerate(definition.segments, start=1):
        results = []
        for condition in segment:
            value, result = row[position], bool(row[position + 1])
            position += 2
            verdicts.append(
                ConditionVerdict(
                    index, condition_json(condition), _describe(condition, value), result
                )
            )
            results.append(result)
        segments.append(bool(results) and all(results))
    return Explanation(user_id, definition.key, any(segments), segments, verdicts, now, tenant)


def _seen_value(condition: Condition, context: CompileContext) -> exp.Expression:
    if condition.operator in EXTENSION_OPERATORS:
        return event_summary(condition, context)
    if condition.operator in ("is_audience_member", "is_not_audience_member"):
        members = context.audience_members(str(condition.argument))
        return exp.In(this=context.user_key, query=exp.paren(members))
    if condition.scope != RECIPIENT:
        attribute = Attribute(condition.path, "json", condition.scope)
        return exp.cast(context.pair_attribute(attribute), "varchar")
    if condition.path == ("id",):
        return context.user_id
    return exp.cast(context.attribute(Attribute(condition.path, "json")), "varchar")


def _describe(condition: Condition, value) -> str:
    if condition.operator in EXTENSION_OPERATORS:
        return _describe_events(value)
    if condition.operator in ("is_audience_member", "is_not_audience_member"):
        return f"{'a member' if value else 'not a member'} of {condition.argument!r} (no tenant)"
    if value is None:
        return "(missing)"
    return value if (condition.path, condition.scope) != (("id",), RECIPIENT) else json.dumps(value)


def _describe_events(summary: dict) -> str:
    """`3 events counted (first ..., last ...; newest message ids: a, b, c)`."""
    count = summary["event_count"]
    if not count:
        return "no events counted"
    times = "; ".join(
        f"{name} {moment.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}"
        for name, moment in (("first", summary["first_at"]), ("last", summary["last_at"]))
    )
    noun = "event" if count == 1 else "events"
    return (
        f"{count} {noun} counted ({times}; newest message ids: {', '.join(summary['message_ids'])})"
    )


def matching_user_ids(
    connection: duckdb.DuckDBPyConnection,
    segments,
    user_ids: list[str],
    now: datetime,
    definitions: dict[str, AudienceDefinition] | None = None,
) -> set[str]:
    """Which of `user_ids` match the conditions now (for workflow trigger conditions)."""
    if not user_ids:
        return set()
    if not segments:
        return set(user_ids)
    import polars as pl

    connection.register(
        "candidate_ids",
        pl.DataFrame({"user_id": user_ids}, schema={"user_id": pl.String}).to_arrow(),
    )
    try:
        candidates = exp.column("user_id", table="users").isin(
            query=exp.select("user_id").from_("candidate_ids")
        )
        query = _users_query(connection, segments, definitions or {}, now, user_filter=candidates)
        condition = compile_segments(segments, query.context)
        rows = connection.execute(
            render(exp.select("users.user_id").from_(query.source).where(condition))
        ).fetchall()
    finally:
        connection.unregister("candidate_ids")
    return {row[0] for row in rows}
