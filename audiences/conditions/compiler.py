"""The one condition compiler: Knock conditions in, SQL boolean expressions out.

Every rule of docs/conditions.md that decides who is in an audience lives here, once. SQL is built
as a SQLGlot syntax tree from templates we own; user text (property names, arguments) only ever
enters as quoted identifiers or literals, so a property named `a"; drop table users; --` is just a
property.

Conditions never read JSON themselves. They read *attributes*: typed views of one property
(`kind`, `text`, `number`, `boolean`, `items`, `timestamp`, `json`), defined here by
`attribute_expression`. The dbt model `int_user_attributes` extracts each attribute an audience
needs once per changed user, so evaluating fifty audiences is fifty scans of typed columns rather
than fifty passes over JSON; `preview` and `explain` use the same expressions inline.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import sqlglot
from sqlglot import exp

from audiences.conditions.arguments import (
    EPOCH_RANGE,
    NUMBER_PATTERN,
    TIMESTAMP_PATTERN,
    Argument,
    ArgumentError,
    DynamicTime,
    RelativeTime,
    TimeArgument,
    decode_argument,
    is_number,
    parse_property_path,
    parse_time_argument,
    time_from_decoded,
)

DIALECT = "duckdb"
# The SQL dialects the compiler writes. DuckDB is the embedded warehouse; Spark (local, a cluster,
# Databricks) reads a property through Spark 4's VARIANT instead of DuckDB's JSON functions.
SPARK = "spark"
DIALECTS = (DIALECT, SPARK)

VARIANTS = ("json", "kind", "text", "number", "boolean", "items", "timestamp")
NUMERIC_JSON_TYPES = ("BIGINT", "UBIGINT", "DOUBLE", "HUGEINT", "INTEGER")
RESERVED_PROPERTIES = {("created_at",): "created_at", ("updated_at",): "updated_at"}

# Operator name -> the kind of argument it takes (used by validation and compilation alike).
OPERATORS: dict[str, str] = {
    "equal_to": "value",
    "not_equal_to": "value",
    "greater_than": "number",
    "greater_than_or_equal_to": "number",
    "less_than": "number",
    "less_than_or_equal_to": "number",
    "is_between": "number_range",
    "contains": "value",
    "not_contains": "value",
    "contains_all": "value",
    "not_contains_all": "value",
    "empty": "none",
    "not_empty": "none",
    "exists": "none",
    "not_exists": "none",
    "is_timestamp_before": "time",
    "is_timestamp_on_or_after": "time",
    "is_timestamp_before_date": "time",
    "is_timestamp_on_or_after_date": "time",
    "is_timestamp_between": "time_range",
    "is_timestamp_before_now": "none",
    "is_timestamp_on_or_after_now": "none",
    "is_timestamp": "none",
    "is_not_timestamp": "none",
    "is_audience_member": "audience",
    "is_not_audience_member": "audience",
    "is_in_random_cohort": "percentage",
    # Extensions beyond Knock (docs/conditions.md, "Event conditions"): what the user did.
    "performed": "event",
    "last_performed_before": "event_time",
    "last_performed_after": "event_time",
}
# Operators Knock does not have: a definition using them is valid here, but not pushable to Knock.
EXTENSION_OPERATORS = ("performed", "last_performed_before", "last_performed_after")


class ConditionError(ValueError):
    """A condition that cannot be compiled; `field` is the part at fault (property/operator/argument)."""

    def __init__(self, message: str, field: str = "argument"):
        super().__init__(message)
        self.field = field


# Whose property a condition reads: the user's (`recipient.*`, or no prefix), or, in an audience
# with `"tenancy": "per_tenant"` (evaluated per user and tenant the user belongs to), the tenant's
# (`tenant.*`) or the user's membership of it (`membership.*`).
RECIPIENT = "recipient"
PAIR_SCOPES = ("tenant", "membership")


@dataclass(frozen=True)
class Attribute:
    """One typed view (`variant`) of one property (`path`) of the user, tenant or membership."""

    path: tuple[str, ...]
    variant: str
    scope: str = RECIPIENT

    @property
    def column_name(self) -> str:
        """Its column: `address__country__text` for the recipient's `address.country`; a
        tenant's or membership's property is prefixed with its scope (`tenant:plan__text`)."""
        stem = f"{property_slug(self.path)}__{self.variant}"
        return stem if self.scope == RECIPIENT else f"{self.scope}:{stem}"

    def column(self, table: str | None = None) -> exp.Column:
        """Its column as SQL, quoted only where the name needs it (a hashed stem may start with a
        digit; a name with `__` and a variant is never a keyword)."""
        return exp.column(exp.to_identifier(self.column_name), table=table)


@dataclass(frozen=True)
class Condition:
    """A parsed condition, ready to compile. `location` is its JSON path in the definition file."""

    path: tuple[str, ...]
    operator: str
    argument: object
    location: str = ""
    has_argument: bool = True
    scope: str = RECIPIENT  # whose property: the recipient's, or a per-tenant pair's (PAIR_SCOPES)

    @property
    def property_name(self) -> str:
        """The property as written in a definition (`recipient.plan`, `tenant.plan`)."""
        if self.scope == RECIPIENT and self.path in ((), ("recipient",)):
            return "recipient"
        return f"{self.scope}." + ".".join(self.path)

    @classmethod
    def from_json(cls, raw: object, location: str = "") -> Condition:
        if not isinstance(raw, dict):
            raise ConditionError(f"a condition must be an object, got {raw!r}", field="condition")
        prop = raw.get("property", raw.get("variable"))
        scope = RECIPIENT
        if isinstance(prop, str) and prop.split(".", 1)[0] in PAIR_SCOPES and "." in prop:
            scope, prop = prop.split(".", 1)
        try:
            path = parse_property_path(prop)
        except ArgumentError as error:
            raise ConditionError(str(error), field="property") from None
        if not _is_unicode(path):
            raise ConditionError(
                "the property contains text that is not valid Unicode (a lone surrogate)",
                "property",
            )
        if not _is_unicode(raw.get("argument")):
            raise ConditionError(
                "the argument contains text that is not valid Unicode (a lone surrogate)"
            )
        operator = raw.get("operator")
        if operator not in OPERATORS:
            close = difflib.get_close_matches(str(operator), OPERATORS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(sorted(OPERATORS))
            raise ConditionError(
                f"unknown operator {operator!r}{hint}; known operators: {known}", "operator"
            )
        return cls(path, operator, raw.get("argument"), location, "argument" in raw, scope)


def _is_unicode(value: object) -> bool:
    """No lone surrogate anywhere in this JSON value's text (SQL text is UTF-8)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_unicode(item) for item in value)
    if isinstance(value, dict):
        return all(_is_unicode(key) and _is_unicode(item) for key, item in value.items())
    return True


# ---------------------------------------------------------------------------------------------
# Attributes: how one property is read from the user's JSON document.


# One part of a property path that reads as itself in a column name: lower-case snake_case, with no
# leading, trailing or double underscore, so `__` between parts is never ambiguous.
_SNAKE_PART = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
# Warehouses cap identifier length; a longer path gets the hashed stem.
SLUG_CHARACTERS = 48


def property_slug(path: tuple[str, ...]) -> str:
    """A readable, collision-free snake_case column stem for a property path.

    Paths of snake_case parts read as themselves, parts joined by `__` (`address.country` is
    `address__country`, an analyst's column needs no quotes). Anything else (upper case, other
    characters, a `__` inside a part, too long) gets a readable prefix, `___` and a short hash,
    because warehouses fold identifier case and cap their length: a readable stem never contains
    `___`, so the two kinds never meet, and two readable stems are equal only for equal paths.
    """
    slug = "__".join(path)
    if all(_SNAKE_PART.fullmatch(part) for part in path) and len(slug) <= SLUG_CHARACTERS:
        return slug
    readable = "_".join(re.findall(r"[a-z0-9]+", ".".join(path).lower()))[:24].strip("_")
    digest = hashlib.sha1("\x1f".join(path).encode()).hexdigest()[:10]
    return f"{readable or 'property'}___{digest}"


def json_pointer(path: tuple[str, ...]) -> str:
    """RFC 6901 pointer for a path: dots, quotes and unicode in names need no escaping."""
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in path)


@functools.lru_cache(maxsize=512)
def _parsed_template(sql: str, dialect: str) -> exp.Expression:
    """A template parsed once (a dry run of 50 audiences parsed the same few 145 times): never
    changed, `_template` fills a copy of it."""
    return sqlglot.parse_one(sql, dialect=dialect)


def _template(sql: str, dialect: str = DIALECT, **values: object) -> exp.Expression:
    tree = _parsed_template(sql, dialect)
    converted = {
        k: v if isinstance(v, exp.Expression) else exp.convert(v) for k, v in values.items()
    }
    return exp.replace_placeholders(tree, **converted)


def _is_json_number(value: exp.Expression) -> exp.Expression:
    """True when a JSON value is a number. Written as ORed equalities: DuckDB's optimizer turns an
    IN or list_contains over a constant list into a join per property, which made extracting
    users' attributes 8-10% slower (bench/analysis.md)."""
    kind = exp.func("json_type", value)
    return exp.paren(
        exp.or_(
            *(
                exp.EQ(this=kind.copy(), expression=exp.Literal.string(name))
                for name in NUMERIC_JSON_TYPES
            )
        )
    )


def _item_key(element: exp.Expression) -> exp.Expression:
    """Canonical key of one JSON list item: strings by text, numbers by float value, ..."""
    return _template(
        "case when json_type(:e) = 'VARCHAR' then 's:' || (:e ->> '$') "
        "when json_type(:e) = 'BOOLEAN' then 'b:' || cast(:e as varchar) "
        "when json_type(:e) = 'NULL' then 'null' "
        "when :is_number then 'n:' || cast(cast(:e as double) + 0.0 as varchar) "
        "else 'j:' || cast(:e as varchar) end",
        e=element,
        is_number=_is_json_number(element),
    )


def attribute_expression(
    value: exp.Expression, variant: str, dialect: str = DIALECT
) -> exp.Expression:
    """The SQL for one variant of a property, given the property's JSON value (NULL if missing).

    On Spark the value is a VARIANT (`property_json` with `dialect="spark"`)."""
    if dialect == SPARK:
        return _spark_attribute(value, variant)
    text = _template("(:v ->> '$')", v=value)
    if variant == "json":
        return value
    if variant == "kind":
        return _template(
            "case when json_type(:v) = 'VARCHAR' then 'string' "
            "when :is_number then 'number' "
            "when json_type(:v) = 'BOOLEAN' then 'boolean' "
            "when json_type(:v) = 'ARRAY' then 'list' "
            "when json_type(:v) = 'OBJECT' then 'object' end",
            v=value,
            is_number=_is_json_number(value),
        )
    if variant == "text":
        return _template("case when json_type(:v) = 'VARCHAR' then :text end", v=value, text=text)
    if variant == "number":
        return _number_expression(value)
    if variant == "boolean":
        return _template(
            "case when json_type(:v) = 'BOOLEAN' then cast(:v as boolean) end", v=value
        )
    if variant == "items":
        element = exp.column("item")
        return _template(
            "case when json_type(:v) = 'ARRAY' then list_transform(:elements, lambda item: :key) end",
            v=value,
            elements=_json_extract(value, "$[*]"),
            key=_item_key(element),
        )
    if variant == "timestamp":
        return _template(
            "case when json_type(:v) = 'VARCHAR' and regexp_full_match(:text, :ts_pattern) "
            "then try_cast(:text as timestamptz) "
            "when :number between :low and :high then to_timestamp(:number) end",
            v=value,
            text=text,
            ts_pattern=TIMESTAMP_PATTERN,
            number=_number_expression(value),
            low=EPOCH_RANGE[0],
            high=EPOCH_RANGE[1],
        )
    raise ValueError(f"unknown attribute variant {variant!r}")


def _number_expression(value: exp.Expression) -> exp.Expression:
    return _template(
        "case when :is_number then cast(:v as double) "
        "when json_type(:v) = 'VARCHAR' and regexp_full_match(:v ->> '$', :pattern) "
        "then cast(:v ->> '$' as double) end",
        v=value,
        is_number=_is_json_number(value),
        pattern=NUMBER_PATTERN,
    )


def property_json(
    path: tuple[str, ...],
    properties: exp.Expression,
    user_id: exp.Expression,
    dialect: str = DIALECT,
) -> exp.Expression:
    """The JSON value of a property read straight from a user's `properties` document.

    On Spark: a VARIANT, the document parsed with `parse_json` (`properties` is its JSON text)."""
    if dialect == SPARK:
        if path == ("id",):
            return exp.cast(user_id, exp.DataType.build("variant", dialect=SPARK))
        return spark_member(exp.Anonymous(this="parse_json", expressions=[properties]), path)
    if path == ("id",):
        return _template("to_json(:user_id)", user_id=user_id)
    return _json_extract(properties, json_pointer(path))


def _json_extract(document: exp.Expression, path: str) -> exp.Expression:
    # A plain function call: SQLGlot would write the `->` operator, which DuckDB does not bind
    # for wildcard paths.
    return exp.Anonymous(this="json_extract", expressions=[document, exp.Literal.string(path)])


# ---------------------------------------------------------------------------------------------
# Spark: a property is a VARIANT (Spark 4), read with the same meaning as DuckDB's JSON above.

# schema_of_variant's names of a JSON number (integers read as BIGINT, decimals as DECIMAL(p,s),
# exponents and huge values as DOUBLE).
_SPARK_NUMBER_TYPES = ("BIGINT", "DOUBLE", "FLOAT", "INT", "SMALLINT", "TINYINT")


def spark_member(document: exp.Expression, path: tuple[str, ...]) -> exp.Expression:
    """A VARIANT's member at `path` (NULL when missing or when a step is not an object).

    Each step reads the object as a map and takes the key as a string literal: Spark's
    variant paths (`$.a`, `$["a"]`) have no escape for a quote in a key, so a property named
    `a"b` could not be addressed by path at all.
    """
    value = document
    for part in path:
        as_map = exp.Anonymous(
            this="try_variant_get",
            expressions=[value, exp.Literal.string("$"), exp.Literal.string("map<string,variant>")],
        )
        value = exp.Anonymous(this="try_element_at", expressions=[as_map, exp.Literal.string(part)])
    return value


def _spark_get(value: exp.Expression, type_name: str) -> exp.Expression:
    return exp.Anonymous(
        this="try_variant_get",
        expressions=[value, exp.Literal.string("$"), exp.Literal.string(type_name)],
    )


def _spark_kind(value: exp.Expression) -> exp.Expression:
    """`string`, `number`, `boolean`, `list`, `object`; NULL when missing or JSON null."""
    return _template(
        "case when :t = 'STRING' then 'string' "
        "when :is_number then 'number' "
        "when :t = 'BOOLEAN' then 'boolean' "
        "when :t like 'ARRAY%' then 'list' "
        "when :t like 'OBJECT%' then 'object' end",
        dialect=SPARK,
        t=exp.Anonymous(this="schema_of_variant", expressions=[value]),
        is_number=_spark_is_number(value),
    )


def _spark_is_number(value: exp.Expression) -> exp.Expression:
    kind = exp.Anonymous(this="schema_of_variant", expressions=[value])
    listed = exp.In(
        this=kind, expressions=[exp.Literal.string(name) for name in _SPARK_NUMBER_TYPES]
    )
    decimal = exp.Like(this=kind.copy(), expression=exp.Literal.string("DECIMAL%"))
    return exp.paren(exp.or_(listed, decimal))


def _spark_full_match(text: exp.Expression, pattern: str) -> exp.Expression:
    # Java's `$` also matches before a final line break ("5\n"); `\z` is the very end.
    return exp.RegexpLike(this=text, expression=exp.Literal.string(f"^(?:{pattern})\\z"))


def _spark_attribute(value: exp.Expression, variant: str) -> exp.Expression:
    """`attribute_expression` on Spark: the same typed views, from a VARIANT."""
    if variant == "json":
        return value
    kind = _spark_kind(value)
    text = _template(
        "case when :kind = 'string' then :text end",
        SPARK,
        kind=kind,
        text=_spark_get(value, "string"),
    )
    if variant == "kind":
        return kind
    if variant == "text":
        return text
    if variant == "number":
        return _spark_number(value)
    if variant == "boolean":
        return _template(
            "case when :kind = 'boolean' then :b end",
            SPARK,
            kind=kind,
            b=_spark_get(value, "boolean"),
        )
    if variant == "items":
        item = exp.column("item")
        key = _template(
            "case when :t = 'STRING' then 's:' || :text "
            "when :t = 'BOOLEAN' then 'b:' || cast(:b as string) "
            "when :t = 'VOID' then 'null' "
            "when :is_number then 'n:' || cast(:n + 0.0 as string) "
            "else 'j:' || to_json(:e) end",
            SPARK,
            t=exp.Anonymous(this="schema_of_variant", expressions=[item]),
            text=_spark_get(item, "string"),
            b=_spark_get(item, "boolean"),
            is_number=_spark_is_number(item),
            n=_spark_get(item, "double"),
            e=item,
        )
        return _template(
            "case when :kind = 'list' then transform(:elements, item -> :key) end",
            SPARK,
            kind=kind,
            elements=_spark_get(value, "array<variant>"),
            key=key,
        )
    if variant == "timestamp":
        return _template(
            "case when :matches then try_cast(:text as timestamp) "
            "when :number between :low and :high then :from_number end",
            SPARK,
            matches=exp.and_(
                exp.EQ(this=kind, expression=exp.Literal.string("string")),
                _spark_full_match(text.copy(), TIMESTAMP_PATTERN),
            ),
            text=text,
            number=_spark_number(value),
            low=EPOCH_RANGE[0],
            high=EPOCH_RANGE[1],
            from_number=exp.Anonymous(this="timestamp_seconds", expressions=[_spark_number(value)]),
        )
    raise ValueError(f"unknown attribute variant {variant!r}")


def _spark_number(value: exp.Expression) -> exp.Expression:
    text = _spark_get(value, "string")
    return _template(
        "case when :is_number then :n when :is_string and :matches then cast(:text as double) end",
        SPARK,
        is_number=_spark_is_number(value),
        n=_spark_get(value, "double"),
        is_string=exp.EQ(
            this=exp.Anonymous(this="schema_of_variant", expressions=[value]),
            expression=exp.Literal.string("STRING"),
        ),
        matches=_spark_full_match(text.copy(), NUMBER_PATTERN),
        text=text,
    )


# ---------------------------------------------------------------------------------------------
# Compiling conditions.

AttributeReader = Callable[[Attribute], exp.Expression]
AudienceReader = Callable[[str], exp.Expression]

# An audience key (and a guide's): the folder name in Knock's CLI layout. Spelled here only.
KEY_PATTERN = re.compile(r"[a-z0-9_-]{1,255}")

# A tenant that is empty or only ASCII whitespace is no tenant (null). The same pattern serves
# Python's `re` (`normalize_tenant` in audiences/store/database.py, on every write) and DuckDB's
# RE2 (`normalized_tenant` and `without_tenant` below), so a blank tenant means the same thing to
# `audiences check` and to an `is_audience_member` condition.
BLANK_TENANT = r"[ \t\n\r\v\f]*"


def normalized_tenant(column: str | exp.Expression = "tenant") -> exp.Expression:
    """SQL of a member's tenant with a blank one as null (`normalize_tenant` in SQL)."""
    value = exp.column(column) if isinstance(column, str) else column
    blank = exp.func("regexp_full_match", value.copy(), exp.Literal.string(BLANK_TENANT))
    return exp.Case(ifs=[exp.If(this=blank, true=exp.Null())], default=value.copy())


def without_tenant(column: str | exp.Expression = "tenant") -> exp.Expression:
    """SQL of "a member with no tenant": the membership `is_audience_member` and `audiences check`
    (with no tenant) count. Null and blank tenants alike."""
    value = exp.column(column) if isinstance(column, str) else column
    return exp.paren(
        exp.or_(
            exp.Is(this=value.copy(), expression=exp.Null()),
            exp.func("regexp_full_match", value.copy(), exp.Literal.string(BLANK_TENANT)),
        )
    )


@dataclass(frozen=True)
class AudienceTenancy:
    """What `is_audience_member` needs to know of the audience it names: its type (`dynamic`,
    `static`, or None for a hand-written SQL audience) and whether it is evaluated per tenant."""

    type: str | None
    per_tenant: bool = False


def reads_pair_membership(tenancy: AudienceTenancy) -> bool:
    """The rule of `is_audience_member` in a per-tenant audience (our rule, reference §10 and
    docs/conditions.md): evaluating the pair (user, tenant T), the condition names an audience X.

    - X carries tenants (a per-tenant audience, a static audience, a hand-written SQL audience):
      the pair (user, T) must be a member of X, tenant-strict as `audiences check --tenant T`
      answers; a membership of X with no tenant, or with another tenant, does not count.
    - X is a dynamic audience without tenancy: its conditions read the user alone, and its
      members never carry a tenant, so the user's membership (user, no tenant) is read: a
      condition on the user holds in every tenant the user belongs to.

    Outside a pair (an audience without tenancy) it is always the user's membership with no
    tenant, tenant-strict as `audiences check` without a tenant: a per-tenant audience has none.
    """
    return not (tenancy.type == "dynamic" and not tenancy.per_tenant)


@dataclass(frozen=True)
class CompileContext:
    """Where a compiled condition reads from.

    `attribute` gives the SQL of an attribute (a column of `int_user_attributes`, or inline JSON
    extraction); `audience_members` gives a query of `user_key` of an audience's members with no
    tenant; `evaluation_time` is the SQL of "now"; `user_key` and `user_id` are the user's columns.
    """

    attribute: AttributeReader
    audience_members: AudienceReader
    evaluation_time: exp.Expression
    user_key: exp.Expression
    user_id: exp.Expression
    # Told of every comparison of a timestamp attribute with "now" shifted by some minutes.
    on_time_window: Callable[[TimeWindow], None] | None = None
    # The relation of loaded events (`message_id`, `user_id`, `event`, `timestamp`, `properties`),
    # which event conditions count (the loader's table unless told otherwise).
    events: exp.Expression | None = None
    # The SQL of a tenant's or membership's attribute, for an audience evaluated per (user,
    # tenant) pair (`pair_attribute`); None where conditions read only the recipient, so that a
    # `tenant.*` or `membership.*` condition is an error naming the property.
    pair_attribute: AttributeReader | None = None
    # The relation of event states (`int_event_state`: `state_key`, `user_number`, `user_id`,
    # `times`), from which an event condition that has a state (`event_state`) reads its verdict
    # instead of counting events; None: count the events.
    event_state: exp.Expression | None = None
    # For an audience evaluated per (user, tenant) pair: the SQL of the pair's tenant, a query of
    # (`user_key`, `tenant`) of an audience's members with their tenants (a blank one as none,
    # `normalized_tenant`), and each audience's tenancy (`AudienceTenancy`). With them,
    # `is_audience_member` reads the pair's membership (`reads_pair_membership`); without them,
    # the user's membership with no tenant.
    pair_tenant: exp.Expression | None = None
    audience_pairs: AudienceReader | None = None
    audience_tenancy: Callable[[str], AudienceTenancy] | None = None


def pair_attribute(attribute: Attribute) -> exp.Expression:
    """A tenant's or membership's attribute, read from the pair's JSON documents: the columns
    `tenant_properties` and `membership_properties`, beside `tenant` (the tenant's id, which
    `tenant.id` reads). The same typed views, so the same operators and rules as the user's."""
    document = exp.column(f"{attribute.scope}_properties")
    if attribute.scope == "tenant":
        value = property_json(attribute.path, document, exp.column("tenant"))
    else:
        value = _json_extract(document, json_pointer(attribute.path))
    return attribute_expression(value, attribute.variant)


@dataclass(frozen=True)
class TimeWindow:
    """A condition comparing `attribute` (a timestamp) with "now" shifted by `minutes`.

    As "now" moves from t0 to t1, such a condition can only change its value for users whose
    timestamp lies between t0 + minutes and t1 + minutes. No other condition reads the evaluation
    time, so an audience's members can only change without a data change for those users: that is
    what lets `audience_members` re-evaluate a time-relative audience for a handful of users.
    """

    attribute: Attribute
    minutes: int

    def moved_over(
        self, column: exp.Expression, previous: exp.Expression, current: exp.Expression
    ) -> exp.Expression:
        """True when `column` (this window's timestamp) lies where "now" moved from `previous` to `current`."""
        # (parsed with an empty alias around it: unwrapped, so that it combines as a condition)
        return _template(
            "(:column between least(:previous, :current) + to_minutes(cast(:minutes as bigint)) "
            "and greatest(:previous, :current) + to_minutes(cast(:minutes as bigint)))",
            column=column,
            previous=previous,
            current=current,
            minutes=exp.Literal.number(self.minutes),
        ).unalias()


def compile_segments(
    segments: Iterable[Iterable[Condition]], context: CompileContext
) -> exp.Expression:
    """OR of segments, each an AND of conditions. No segments, or an empty segment, matches nobody."""
    disjuncts = []
    for segment in segments:
        conditions = [compile_condition(condition, context) for condition in segment]
        disjuncts.append(exp.and_(*conditions) if conditions else exp.false())
    if not disjuncts:
        return exp.false()
    return exp.or_(*disjuncts)


def compile_condition(condition: Condition, context: CompileContext) -> exp.Expression:
    """One condition as a SQL boolean that is never NULL (a missing property is never "unknown")."""
    negated = condition.operator in _NEGATIONS
    operator = _NEGATIONS.get(condition.operator, condition.operator)
    if condition.path in RESERVED_PROPERTIES and operator not in (
        "is_audience_member",
        "is_in_random_cohort",
        *EXTENSION_OPERATORS,
    ):
        raise ConditionError(
            f"`{condition.path[0]}` is reserved and cannot be used in audience conditions "
            "(Knock's rule); store it as a custom property instead",
            field="property",
        )
    if (
        condition.scope == RECIPIENT
        and condition.path in ((), ("recipient",))
        and operator not in ("is_audience_member", *EXTENSION_OPERATORS)
    ):
        # `recipient` alone is the user, which only membership and event operators read: as a
        # property it read a custom property named `recipient`, so `exists` matched nobody.
        raise ConditionError(
            f"`{condition.operator}` reads a property of the recipient: name one, such as "
            '"recipient.email" ("recipient" alone is the user)',
            field="property",
        )
    kind = OPERATORS[condition.operator]
    if kind == "none" and condition.has_argument and condition.argument not in (None, ""):
        raise ConditionError(f"`{condition.operator}` takes no argument")
    if condition.scope != RECIPIENT and context.pair_attribute is None:
        raise ConditionError(
            f"`{condition.property_name}` reads the {condition.scope}: only an audience with "
            '"tenancy": "per_tenant" is evaluated per tenant',
            field="property",
        )
    if condition.scope != RECIPIENT and operator in (
        "is_audience_member",
        "is_in_random_cohort",
        *EXTENSION_OPERATORS,
    ):
        raise ConditionError(
            f"`{condition.operator}` applies to the recipient, not `{condition.property_name}`",
            field="property",
        )
    reader = _Reader(condition.path, context, condition.scope)
    expression = _COMPILERS[operator](condition, reader, context)
    expression = exp.func("coalesce", exp.paren(expression), exp.false())
    return exp.not_(expression) if negated else expression


_NEGATIONS = {
    "not_equal_to": "equal_to",
    "not_contains": "contains",
    "not_contains_all": "contains_all",
    "not_empty": "empty",
    "not_exists": "exists",
    "is_not_timestamp": "is_timestamp",
    "is_not_audience_member": "is_audience_member",
}


class _Reader:
    """Attributes of the condition's property, by variant name."""

    def __init__(self, path: tuple[str, ...], context: CompileContext, scope: str = RECIPIENT):
        self.path, self.context, self.scope = path, context, scope

    def __getattr__(self, variant: str) -> exp.Expression:
        if variant not in VARIANTS:
            raise AttributeError(variant)
        if self.scope != RECIPIENT:
            return self.context.pair_attribute(Attribute(self.path, variant, self.scope))
        return self.context.attribute(Attribute(self.path, variant))

    def scalar_key(self) -> exp.Expression:
        """Canonical key of a scalar property; a missing property reads as the string ""."""
        return _template(
            "case when :kind is null then 's:' "
            "when :kind = 'string' then 's:' || :text "
            "when :kind = 'number' then 'n:' || cast(:number + 0.0 as varchar) "
            "when :kind = 'boolean' then 'b:' || cast(:boolean as varchar) end",
            kind=self.kind,
            text=self.text,
            number=self.number,
            boolean=self.boolean,
        )


def _argument_key(value: object) -> exp.Expression:
    """The canonical key of an argument value, computed by the warehouse like a property's."""
    if isinstance(value, bool):
        return exp.Literal.string("b:true" if value else "b:false")
    if value is None:
        return exp.Literal.string("null")
    if isinstance(value, str) and _is_unicode(value):
        return exp.Literal.string("s:" + value)
    if is_number(value):
        return _template(
            "'n:' || cast(cast(:n as double) + 0.0 as varchar)", n=_number_literal(value)
        )
    # A list or an object has no key: it matches no item (a nested item's key starts with 'j:'),
    # nor does a string no property can hold (`"\\ud800"` decodes to a lone surrogate).
    return exp.Literal.string("x:")


def _number_literal(value: float | int) -> exp.Expression:
    if isinstance(value, float) and value != value:
        raise ConditionError(f"{value!r} is not a usable number")
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        # A JSON number beyond a double's range (1e400) reads as an infinite double.
        return exp.cast(exp.Literal.string("inf" if value > 0 else "-inf"), "double")
    return exp.Literal.number(repr(float(value)) if isinstance(value, float) else str(value))


def _keys(values: list) -> exp.Expression:
    return exp.Array(expressions=[_argument_key(value) for value in values])


def _static(condition: Condition) -> Argument:
    if not condition.has_argument:
        raise ConditionError(f"`{condition.operator}` needs an argument")
    return decode_argument(condition.argument)


def _compile_equal_to(
    condition: Condition, read: _Reader, context: CompileContext
) -> exp.Expression:
    argument = _static(condition)
    value = argument.value
    if isinstance(value, list):
        return _template(
            "(:kind = 'list' and :items = :keys)",
            kind=read.kind,
            items=read.items,
            keys=_keys(value),
        )
    if isinstance(value, dict):
        return exp.false()
    if isinstance(value, str) and value == "":
        matches_value = _template("(:kind is null or :text = '')", kind=read.kind, text=read.text)
    elif isinstance(value, str):
        matches_value = (
            exp.EQ(this=read.text, expression=exp.Literal.string(value))
            if _is_unicode(value)
            else exp.false()
        )
    elif value is None:
        matches_value = exp.false()
    elif isinstance(value, bool):
        matches_value = exp.EQ(this=read.boolean, expression=exp.Boolean(this=value))
    else:
        matches_value = _template(
            "(:kind = 'number' and :number = :n)",
            kind=read.kind,
            number=read.number,
            n=_number_literal(value),
        )
    # Or the property is a string equal to the argument's original text (`"\"q\""` matches `"q"`
    # with its quotes, `"5"` matches the string "5").
    if argument.original_text is None or argument.original_text == value:
        return matches_value
    return exp.or_(
        matches_value, exp.EQ(this=read.text, expression=exp.Literal.string(argument.original_text))
    )


def _compile_ordering(
    condition: Condition, read: _Reader, context: CompileContext
) -> exp.Expression:
    value = _static(condition).value
    if not is_number(value):
        raise ConditionError(
            f"`{condition.operator}` compares numbers; {condition.argument!r} is not a number"
        )
    comparison = {
        "greater_than": exp.GT,
        "greater_than_or_equal_to": exp.GTE,
        "less_than": exp.LT,
        "less_than_or_equal_to": exp.LTE,
    }[condition.operator]
    return comparison(this=read.number, expression=_number_literal(value))


def _compile_is_between(
    condition: Condition, read: _Reader, context: CompileContext
) -> exp.Expression:
    value = _static(condition).value
    if not (isinstance(value, list) and len(value) == 2 and all(is_number(v) for v in value)):
        raise ConditionError(f"`is_between` needs [low, high] numbers, got {condition.argument!r}")
    return exp.Between(
        this=read.number, low=_number_literal(value[0]), high=_number_literal(value[1])
    )


def _compile_contains(
    condition: Condition, read: _Reader, context: CompileContext
) -> exp.Expression:
    argument = _static(condition)
    value = argument.value
    if value is None or isinstance(value, dict):
        return exp.false()
    if isinstance(value, list):
        return _template(
            "case when :kind = 'list' then list_has_any(:items, :keys) "
            "when :kind is null or :kind in ('string', 'number', 'boolean') then array_contains(:keys, :key) "
            "else false end",
            kind=read.kind,
            items=read.items,
            keys=_keys(value),
            key=read.scalar_key(),
        )
    # A list item matches by key, or (for an argument written as text) as a string equal to the
    # argument's original text. `array_contains`, not DuckDB's `list_contains`: every dialect's
    # reader knows that name, so the rendering never depends on the template's dialect (one CI
    # worker rendered `list_contains` where the committed models say `array_contains`).
    key, text_key = _argument_key(value), _original_text_key(argument)
    in_list = (
        "array_contains(:items, :key)"
        if text_key in (None, key)
        else "array_contains(:items, :key) or array_contains(:items, :text_key)"
    )
    return _template(
        f"case when :kind = 'list' then {in_list} "
        "when :kind is null then :empty_matches "
        "when :kind = 'string' then contains(:text, :needle) "
        "else false end",
        kind=read.kind,
        items=read.items,
        key=key,
        text_key=text_key,
        empty_matches=exp.Boolean(this=argument.text == ""),
        text=read.text,
        needle=argument.text,
    )


def _compile_contains_all(
    condition: Condition, read: _Reader, context: CompileContext
) -> exp.Expression:
    argument = _static(condition)
    value = argument.value
    if value is None or isinstance(value, dict):
        return exp.false()
    if isinstance(value, list):
        return _template(
            "(:kind = 'list' and list_has_all(:items, :keys))",
            kind=read.kind,
            items=read.items,
            keys=_keys(value),
        )
    key, text_key = _argument_key(value), _original_text_key(argument)
    if text_key in (None, key):
        return _template(
            "(:kind = 'list' and array_contains(:items, :key))",
            kind=read.kind,
            items=read.items,
            key=key,
        )
    return _template(
        "(:kind = 'list' and (array_contains(:items, :key) or array_contains(:items, :text_key)))",
        kind=read.kind,
        items=read.items,
        key=key,
        text_key=text_key,
    )


def _original_text_key(argument: Argument) -> exp.Expression | None:
    """The key of a string item equal to the argument's original text (none for a non-string argument)."""
    if argument.original_text is None:
        return None
    return exp.Literal.string("s:" + argument.original_text)


def _compile_empty(condition: Condition, read: _Reader, context: CompileContext) -> exp.Expression:
    return _template(
        "(:kind is null or :text = '' or (:kind = 'list' and len(:items) = 0))",
        kind=read.kind,
        text=read.text,
        items=read.items,
    )


def _compile_exists(condition: Condition, read: _Reader, context: CompileContext) -> exp.Expression:
    return exp.Not(this=exp.Is(this=read.kind, expression=exp.Null()))


def time_argument_sql(argument: TimeArgument, context: CompileContext) -> exp.Expression:
    """A parsed time argument as SQL: relative to the evaluation time, absolute, or another property."""
    if isinstance(argument, RelativeTime):
        return _template(
            "(:now + to_minutes(cast(:minutes as bigint)))",
            now=context.evaluation_time,
            minutes=argument.minutes,
        )
    if isinstance(argument, DynamicTime):
        return context.attribute(Attribute(argument.path, "timestamp"))
    return timestamp_literal(argument)


def timestamp_literal(moment: datetime) -> exp.Expression:
    text = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
    return exp.Cast(this=exp.Literal.string(text), to=exp.DataType.build("timestamptz"))


def _time_argument(
    raw: object, read: _Reader, context: CompileContext, bound: int | None = None
) -> exp.Expression:
    """A time argument as SQL; `bound` is the index of an already-decoded `[start, end]` bound."""
    try:
        argument = parse_time_argument(raw) if bound is None else time_from_decoded(raw)
    except ArgumentError as error:
        raise ConditionError(
            str(error), "argument" if bound is None else f"argument[{bound}]"
        ) from None
    if isinstance(argument, RelativeTime):
        _note_time_window(read, argument.minutes, context)
    if isinstance(argument, DynamicTime) and argument.path in RESERVED_PROPERTIES:
        raise ConditionError(
            f"`{argument.path[0]}` is reserved and cannot be used in audience conditions (Knock's rule)",
            "argument" if bound is None else f"argument[{bound}]",
        )
    return time_argument_sql(argument, context)


def _note_time_window(read: _Reader, minutes: int, context: CompileContext) -> None:
    # A tenant's or membership's timestamp keeps its scope: the users' time windows take the
    # recipient's, a per-tenant audience's pairs the others (audiences/dbt/tenants.py).
    if context.on_time_window is not None:
        context.on_time_window(TimeWindow(Attribute(read.path, "timestamp", read.scope), minutes))


def _compile_time_compare(
    condition: Condition, read: _Reader, context: CompileContext
) -> exp.Expression:
    if not condition.has_argument:
        raise ConditionError(f"`{condition.operator}` needs a time argument")
    bound = _time_argument(condition.argument, read, context)
    before = condition.operator.startswith("is_timestamp_before")
    return (exp.LT if before else exp.GTE)(this=read.timestamp, expression=bound)


def _compile_time_between(
    condition: Condition, read: _Reader, context: CompileContext
) -> exp.Expression:
    raw = condition.argument
    if isinstance(raw, str):
        decoded = decode_argument(raw).value
        raw = decoded if isinstance(decoded, list) else raw
    if not (isinstance(raw, list) and len(raw) == 2):
        raise ConditionError(
            f"`is_timestamp_between` needs [start, end], got {condition.argument!r}"
        )
    low, high = (_time_argument(value, read, context, bound) for bound, value in enumerate(raw))
    return exp.Between(this=read.timestamp, low=low, high=high)


def _compile_now_compare(
    condition: Condition, read: _Reader, context: CompileContext
) -> exp.Expression:
    before = condition.operator == "is_timestamp_before_now"
    _note_time_window(read, 0, context)
    return (exp.LT if before else exp.GTE)(this=read.timestamp, expression=context.evaluation_time)


def _compile_is_timestamp(
    condition: Condition, read: _Reader, context: CompileContext
) -> exp.Expression:
    return exp.Not(this=exp.Is(this=read.timestamp, expression=exp.Null()))


def audience_argument(condition: Condition) -> str:
    """The audience key an `is_audience_member` condition names."""
    key = condition.argument
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise ConditionError(
            f"`{condition.operator}` needs an audience key as argument, got {key!r}"
        )
    if condition.path not in (("recipient",), ()):
        raise ConditionError(
            f'`{condition.operator}` applies to the recipient: use "property": "recipient"',
            field="property",
        )
    return key


def _compile_audience_member(
    condition: Condition, read: _Reader, context: CompileContext
) -> exp.Expression:
    key = audience_argument(condition)
    if (
        context.pair_tenant is not None
        and context.audience_pairs is not None
        and context.audience_tenancy is not None
        and reads_pair_membership(context.audience_tenancy(key))
    ):
        # The pair (user, tenant) among the members with their tenants (`reads_pair_membership`).
        pair = exp.Tuple(expressions=[context.user_key.copy(), context.pair_tenant.copy()])
        return exp.In(this=pair, query=exp.paren(context.audience_pairs(key)))
    members = context.audience_members(key)
    return exp.In(this=context.user_key, query=exp.paren(members))


def _compile_random_cohort(
    condition: Condition, read: _Reader, context: CompileContext
) -> exp.Expression:
    value = _static(condition).value
    if not is_number(value) or not 0 <= value <= 100:
        raise ConditionError(
            f"`is_in_random_cohort` needs a percentage from 0 to 100, got {condition.argument!r}"
        )
    if condition.path != ("id",):
        raise ConditionError("`is_in_random_cohort` applies to `recipient.id`", field="property")
    return _template(
        "(cast('0x' || substr(md5(:user_id), 1, 8) as ubigint) % 100) < :percent",
        user_id=context.user_id,
        percent=_number_literal(value),
    )


# ---------------------------------------------------------------------------------------------
# Event conditions (an extension beyond Knock): what the user did, counted over loaded events.

EVENTS_TABLE = "raw.events"
EVENT_COUNTS = ("at_least", "at_most", "exactly")
_EVENT_KEYS = {
    "performed": ("event", "count", "within", "where"),
    "last_performed_before": ("event", "time", "where"),
    "last_performed_after": ("event", "time", "where"),
}
# The operators of event conditions (they count loaded events, not the user's properties).
EVENT_OPERATORS = tuple(_EVENT_KEYS)
# Operators a `where` cannot use: they read the user, not the event.
_NOT_EVENT_PROPERTY_OPERATORS = (
    "is_audience_member",
    "is_not_audience_member",
    "is_in_random_cohort",
    *EXTENSION_OPERATORS,
)
_WITHIN_TEXT = re.compile(r"(?P<value>[0-9]+)[ _](?P<unit>(minute|hour|day|week)s?)([ _]ago)?")


@dataclass(frozen=True)
class EventArgument:
    """An event condition's argument, parsed: which events count, and the verdict's rule.

    `count` is (`at_least`|`at_most`|`exactly`, N) for `performed`; `window` is a `RelativeTime`
    (the last D before "now"), `(after, before)` bounds (either may be None), or None (all time);
    `time` is the bound `last_performed_before/after` compares the last event's time with.
    """

    event: str
    where: tuple[Condition, ...]
    count: tuple[str, int] | None = None
    window: RelativeTime | tuple[TimeArgument | None, TimeArgument | None] | None = None
    time: TimeArgument | None = None


def event_argument(condition: Condition) -> EventArgument:
    """Parse an event condition's argument; a `ConditionError` names the field at fault."""
    raw = condition.argument
    if isinstance(raw, str):
        raw = decode_argument(raw).value
    allowed = _EVENT_KEYS[condition.operator]
    if not isinstance(raw, dict):
        raise ConditionError(
            f"`{condition.operator}` takes an object {{{', '.join(map(repr, allowed))}}}, got {condition.argument!r}"
        )
    unknown = sorted(set(raw) - set(allowed), key=str)
    if unknown:
        raise ConditionError(
            f"unknown key {unknown[0]!r}; `{condition.operator}` takes {', '.join(allowed)}",
            f"argument.{unknown[0]}",
        )
    event = raw.get("event")
    if not isinstance(event, str) or event == "":
        raise ConditionError(
            f"`event` is the event's name, a non-empty string, got {event!r}", "argument.event"
        )
    where = _event_where(raw.get("where"))
    if condition.operator != "performed":
        if "time" not in raw:
            raise ConditionError(f"`{condition.operator}` needs a `time`", "argument.time")
        return EventArgument(event, where, time=_event_time(raw["time"], "argument.time"))
    return EventArgument(event, where, _event_count(raw.get("count")), _event_window(raw))


def _event_count(raw: object) -> tuple[str, int]:
    if raw is None:
        raise ConditionError(
            '`performed` needs a `count`: {"at_least"|"at_most"|"exactly": N}', "argument.count"
        )
    if not (isinstance(raw, dict) and len(raw) == 1 and next(iter(raw)) in EVENT_COUNTS):
        raise ConditionError(
            f'`count` is one of {{"at_least": N}}, {{"at_most": N}}, {{"exactly": N}}, got {raw!r}',
            "argument.count",
        )
    ((kind, number),) = raw.items()
    if not (isinstance(number, int) and not isinstance(number, bool)) or number < 0:
        raise ConditionError(
            f"`count.{kind}` is a whole number, 0 or more, got {number!r}", f"argument.count.{kind}"
        )
    return kind, number


def _event_window(raw: dict) -> RelativeTime | tuple | None:
    within = raw.get("within")
    if within is None:
        return None
    if isinstance(within, str):
        match = _WITHIN_TEXT.fullmatch(within)
        if match is None:
            raise ConditionError(
                f'`within` is a duration ("30 days", {{"value": 30, "unit": "days"}}) or '
                f'{{"after": T, "before": T}}, got {within!r}',
                "argument.within",
            )
        return _duration(int(match.group("value")), match.group("unit"))
    if isinstance(within, dict) and "value" in within:
        if (
            not set(within) <= {"value", "unit", "direction"}
            or within.get("direction", "ago") != "ago"
        ):
            raise ConditionError(
                f'a `within` duration is {{"value": N, "unit": "days"}}, got {within!r}',
                "argument.within",
            )
        value, unit = within.get("value"), within.get("unit")
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ConditionError(
                f"`within.value` is a positive whole number, got {value!r}", "argument.within.value"
            )
        if not isinstance(unit, str) or not re.fullmatch(r"(minute|hour|day|week)s?", unit):
            raise ConditionError(
                f"unknown time unit {unit!r}: use minutes, hours, days or weeks",
                "argument.within.unit",
            )
        return _duration(value, unit)
    if isinstance(within, dict) and within and set(within) <= {"after", "before"}:
        return (
            _event_time(within["after"], "argument.within.after") if "after" in within else None,
            _event_time(within["before"], "argument.within.before") if "before" in within else None,
        )
    raise ConditionError(
        f'`within` is a duration ("30 days", {{"value": 30, "unit": "days"}}) or '
        f'{{"after": T, "before": T}}, got {within!r}',
        "argument.within",
    )


def _duration(value: int, unit: str) -> RelativeTime:
    try:
        return parse_time_argument({"value": value, "unit": unit, "direction": "ago"})
    except ArgumentError as error:
        raise ConditionError(str(error), "argument.within") from None


def _event_time(raw: object, field: str) -> TimeArgument:
    try:
        moment = parse_time_argument(raw)
    except ArgumentError as error:
        raise ConditionError(str(error), field) from None
    if isinstance(moment, DynamicTime) and moment.path in RESERVED_PROPERTIES:
        raise ConditionError(
            f"`{moment.path[0]}` is reserved and cannot be used in audience conditions (Knock's rule)",
            field,
        )
    return moment


def _event_where(raw: object) -> tuple[Condition, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConditionError(
            f"`where` is a list of conditions on the event's properties, got {raw!r}",
            "argument.where",
        )
    conditions = []
    for index, item in enumerate(raw):
        field = f"argument.where[{index}]"
        try:
            condition = Condition.from_json(item)
        except ConditionError as error:
            raise ConditionError(str(error), f"{field}.{error.field}") from None
        if len(condition.path) < 2 or condition.path[0] != "data":
            raise ConditionError(
                "a `where` condition reads an event property: `data.<property>`",
                f"{field}.property",
            )
        if condition.operator in _NOT_EVENT_PROPERTY_OPERATORS:
            raise ConditionError(
                f"`{condition.operator}` cannot filter events; use a property operator",
                f"{field}.operator",
            )
        try:  # compiling is the argument check, as for any condition
            compile_condition(condition, _event_property_context(_recording_context()))
        except ConditionError as error:
            raise ConditionError(str(error), f"{field}.{error.field}") from None
        conditions.append(condition)
    return tuple(conditions)


def _recording_context() -> CompileContext:
    return CompileContext(
        attribute=lambda attribute: exp.column(attribute.column_name, quoted=True),
        audience_members=lambda key: exp.select("user_key").from_("members"),
        evaluation_time=exp.column("now"),
        user_key=exp.column("user_key"),
        user_id=exp.column("user_id"),
    )


def _event_property_context(context: CompileContext) -> CompileContext:
    """The context of a `where` condition: attributes are the event's properties (`data.<path>`),
    read from its JSON like a user's, with the same typing and null rules."""

    def event_property(attribute: Attribute) -> exp.Expression:
        if attribute.path[:1] != ("data",) or len(attribute.path) < 2:
            raise ConditionError(
                "a `where` condition reads only the event's properties (`data.<property>`)"
            )
        value = _json_extract(exp.column("event_properties"), json_pointer(attribute.path[1:]))
        return attribute_expression(value, attribute.variant)

    return CompileContext(
        attribute=event_property,
        audience_members=context.audience_members,
        evaluation_time=context.evaluation_time,
        user_key=context.user_key,
        user_id=context.user_id,
    )


def _counted_events(
    condition: Condition, context: CompileContext, correlated: bool = True
) -> tuple[exp.Select, EventArgument]:
    """The query of the events that the condition counts (filters only, no projection): this
    user's (`correlated`), or every user's.

    The events' columns are renamed (`event_user_id`, ...) so that, in a correlated subquery,
    every other column name binds to the user's row.
    """
    argument = event_argument(condition)
    table = context.events if context.events is not None else exp.to_table(EVENTS_TABLE)
    renamed = exp.select(
        exp.alias_(exp.column("message_id"), "event_message_id"),
        exp.alias_(exp.column("user_id"), "event_user_id"),
        exp.alias_(exp.column("event"), "event_name"),
        exp.alias_(exp.column("timestamp", quoted=True), "event_at"),
        exp.alias_(exp.column("properties"), "event_properties"),
    ).from_(table)
    at = exp.column("event_at")
    filters: list[exp.Expression] = [
        exp.column("event_name").eq(exp.Literal.string(argument.event)),
        # an event stamped after "now" has not happened yet at this evaluation
        exp.LTE(this=at.copy(), expression=context.evaluation_time),
    ]
    if isinstance(argument.window, RelativeTime):
        filters.append(
            exp.GT(this=at.copy(), expression=time_argument_sql(argument.window, context))
        )
    elif argument.window is not None:
        after, before = argument.window
        if after is not None:
            filters.append(exp.GT(this=at.copy(), expression=time_argument_sql(after, context)))
        if before is not None:
            filters.append(exp.LT(this=at.copy(), expression=time_argument_sql(before, context)))
    nested = _event_property_context(context)
    filters += [compile_condition(where, nested) for where in argument.where]
    if correlated:
        filters.insert(0, exp.column("event_user_id").eq(context.user_id))
    query = exp.select().from_(renamed.subquery("counted_events")).where(exp.and_(*filters))
    return query, argument


def _reads_the_user(argument: EventArgument) -> bool:
    """True when a bound is `{{ recipient.<path> }}`: the events counted then depend on the user."""
    bounds = [argument.time, *(argument.window if isinstance(argument.window, tuple) else ())]
    return any(isinstance(bound, DynamicTime) for bound in bounds)


def _users_having(
    condition: Condition, context: CompileContext, having: Callable[[EventArgument], exp.Expression]
) -> exp.Expression:
    """The user is among those whose counted events meet `having`: one uncorrelated semi-join (a
    scan and a hash aggregate of the events, cheap to plan), or, when a bound reads the user, the
    same aggregate correlated with the user's row."""
    argument = event_argument(condition)
    if _reads_the_user(argument):
        query, _ = _counted_events(condition, context)
        return exp.Exists(
            this=exp.paren(query.select(exp.Literal.number(1)).having(having(argument)))
        )
    query, _ = _counted_events(condition, context, correlated=False)
    users = (
        query.select(exp.column("event_user_id"))
        .group_by(exp.column("event_user_id"))
        .having(having(argument))
    )
    return exp.In(this=context.user_id, query=exp.paren(users))


_COUNT_COMPARISONS = {"at_least": exp.GTE, "at_most": exp.LTE, "exactly": exp.EQ}


def _compile_performed(condition: Condition, context: CompileContext) -> exp.Expression:
    kind, number = event_argument(condition).count
    if kind == "at_least" and number == 0:
        return exp.true()
    state = event_state(condition) if context.event_state is not None else None
    if state is not None:
        return _performed_from_state(condition, state, kind, number, context)
    if kind == "at_most" or (kind == "exactly" and number == 0):
        # No counted event is a count of 0: "at most N" is "not more than N".
        more = _users_having(
            condition,
            context,
            lambda _: exp.GT(
                this=exp.Count(this=exp.Star()), expression=exp.Literal.number(number)
            ),
        )
        return exp.not_(exp.func("coalesce", exp.paren(more), exp.false()))
    return _users_having(
        condition,
        context,
        lambda _: _COUNT_COMPARISONS[kind](
            this=exp.Count(this=exp.Star()), expression=exp.Literal.number(number)
        ),
    )


def _compile_last_performed(condition: Condition, context: CompileContext) -> exp.Expression:
    before = condition.operator == "last_performed_before"
    state = event_state(condition) if context.event_state is not None else None
    if state is not None:
        return _state_users(condition, state, context)

    def last_event(argument: EventArgument) -> exp.Expression:
        bound = time_argument_sql(argument.time, context)
        return (exp.LT if before else exp.GTE)(
            this=exp.Max(this=exp.column("event_at")), expression=bound
        )

    return _users_having(condition, context, last_event)


# ---------------------------------------------------------------------------------------------
# Event state (int_event_state): per user and event condition, what its verdict needs, kept up to
# date from new events alone, and the time at which its verdict can next change.

_STATE_NOW = "state_now"  # "now" beside each state row, which a verdict's lambdas read
STATE_KEY_LENGTH = 12  # hexadecimal digits of an event condition's state key
EVENT_STATE_MARKER = -1  # `user_number` of a condition's marker row: its watermark and "now"


@dataclass(frozen=True)
class EventState:
    """What an event condition keeps per user (docs/conditions.md, "Event state").

    A user's state is the times of their qualifying events (the name, `where`, absolute bounds),
    newest first: every one stamped after "now" (it counts once "now" reaches it) and, of those
    at or before "now" and inside a relative window, the `keep` most recent: enough to tell the
    count up to `keep`, which each comparison needs, and the last time. As "now" only moves
    forward, an event that left the window or is older than the `keep` most recent can never
    count again; a late event merges into the list like any other, and nothing else is read.

    `window` is a relative window's shift in minutes (an event counts while its time is after
    now + window); `thresholds` are the ranks j whose event leaving the window flips the verdict
    (the N-th most recent for "at least N", the (N+1)-th for "at most N", both for "exactly N");
    `last_shift` is the shift of a `last_performed_*` relative bound.
    """

    key: str
    event: str
    where: tuple[Condition, ...]
    after: datetime | None
    before: datetime | None
    keep: int
    window: int | None = None
    thresholds: tuple[int, ...] = ()
    last_shift: int | None = None


def event_state(condition: Condition) -> EventState | None:
    """The state an event condition keeps per user; None for "at least 0" (always true) and for
    conditions counted over the user's events instead: a bound read from the user, a relative
    bound inside `within: {after, before}`, a `where` that compares a property with "now"."""
    argument = event_argument(condition)
    if _reads_the_user(argument):
        return None
    compares_now: list[TimeWindow] = []
    nested = replace(
        _event_property_context(_recording_context()), on_time_window=compares_now.append
    )
    for where in argument.where:
        compile_condition(where, nested)
    if compares_now:
        return None
    raw = condition.argument
    if isinstance(raw, str):
        raw = decode_argument(raw).value
    text = json.dumps([condition.operator, raw], sort_keys=True, ensure_ascii=False, default=str)
    # 12 characters (48 bits): DuckDB keeps a string of up to 12 bytes inline, so the state's
    # joins on (key, user) hash and compare it without following a pointer (~15% of a join).
    key = hashlib.sha256(text.encode()).hexdigest()[:STATE_KEY_LENGTH]
    if condition.operator != "performed":
        shift = argument.time.minutes if isinstance(argument.time, RelativeTime) else None
        return EventState(key, argument.event, argument.where, None, None, 1, last_shift=shift)
    kind, number = argument.count
    if kind == "at_least" and number == 0:
        return None
    ranks = {"at_least": (number,), "at_most": (number + 1,), "exactly": (number, number + 1)}
    thresholds = tuple(rank for rank in ranks[kind] if rank >= 1)
    after = before = None
    window = argument.window
    if isinstance(window, tuple):
        after, before = window
        if not all(bound is None or isinstance(bound, datetime) for bound in window):
            return None
    shift = window.minutes if isinstance(window, RelativeTime) else None
    return EventState(
        key,
        argument.event,
        argument.where,
        after,
        before,
        max(thresholds),
        shift,
        thresholds if shift is not None else (),
    )


def _state_qualifies(state: EventState, context: CompileContext) -> exp.Expression:
    """Whether an event (`event_name`, `event_at`, `event_properties`) is one the state keeps,
    whatever "now" is: as `_counted_events`, less its comparisons with "now"."""
    at = exp.column("event_at")
    filters: list[exp.Expression] = [exp.column("event_name").eq(exp.Literal.string(state.event))]
    if state.after is not None:
        filters.append(exp.GT(this=at.copy(), expression=timestamp_literal(state.after)))
    if state.before is not None:
        filters.append(exp.LT(this=at.copy(), expression=timestamp_literal(state.before)))
    nested = _event_property_context(context)
    filters += [compile_condition(where, nested) for where in state.where]
    return exp.and_(*filters)


def _counts_now(state: EventState, now: exp.Expression) -> exp.Expression:
    """The lambda body telling whether a kept time `t` counts at `now`."""
    if state.window is None:
        return _template("t <= :now", now=now)
    return _template(
        "t <= :now and t > :now + to_minutes(cast(:minutes as bigint))",
        now=now,
        minutes=state.window,
    )


# The per-condition numbers of the state's rule, as the columns of one `parameters` row: the
# kept count, the window's shift, the two threshold ranks, the last-performed bound's shift.
_STATE_PARAMETERS = (
    "state_key, keep, window_minutes, rank_a, rank_b, last_shift, after_seq, incremental, "
    "state_now, test_number"
)
_EMPTY_TIMES = "cast([] as timestamptz[])"


def event_state_sql(
    conditions: Iterable[Condition],
    context: CompileContext,
    through: exp.Expression,
    previous: exp.Expression | None = None,
    markers: Callable[[str], tuple[exp.Expression, exp.Expression]] | None = None,
    due: exp.Expression | None = None,
) -> str:
    """The rows of `int_event_state` for these event conditions (those with a state; the others
    are left out) at `context.evaluation_time`, over the events `context.events` (with
    `event_seq`, `user_number`) loaded up to `through`, as one DuckDB statement.

    Given `previous` (the state table), `markers(key)` gives a condition's (`after`, `incremental`)
    SQL: when `incremental` holds, only the users with qualifying events loaded after `after`,
    and those whose verdict is due to change (`next_change` at or before "now"), are computed:
    from their kept times and their new events alone, never their older events. Otherwise (and
    for every condition without `previous`) every user, from all events, with `due_at` = `due`.
    Each row keeps the times the verdict needs (`EventState`), the next change: the first event
    stamped after "now" (it then counts); in a relative window, the threshold ranks' events plus
    the window's length (they leave it then); for a `last_performed_*` relative bound, the last
    time minus its shift plus a microsecond (before: `last < now + shift`; after:
    `last >= now + shift`, both cross one microsecond after equality); and `due_at`, the latest
    next change a build passed, which `int_event_users_to_reevaluate` lists. Each condition also
    writes its marker row (`user_number` -1): the events its state covers and the "now" it was
    kept at.

    A condition recomputed from every event writes no row for a user without a qualifying event
    after its window's start at this "now" (every other user's events, past or future, give one),
    and dbt's delete+insert keeps that user's older row. It says what no row says: a true `holds`
    counted an event that lies after this window's start (the row was kept at a later "now", or
    its verdict is still current: the event has not left the window), which would give a new
    row; and the times it keeps count nothing at this "now" or later. The tests replaying time
    going back: tests/audiences/conditions/test_event_conditions.py.
    """

    def sql(expression: exp.Expression) -> str:
        return render(expression, pretty=False)

    states: dict[str, tuple[Condition, EventState]] = {}
    for condition in conditions:
        state = event_state(condition)
        if state is not None:
            states.setdefault(state.key, (condition, state))
    now = sql(context.evaluation_time)
    table = sql(context.events if context.events is not None else exp.to_table(EVENTS_TABLE))
    rows, qualifying, tests = [], [], []
    for number, (key, (condition, state)) in enumerate(sorted(states.items())):
        after, incremental = (
            markers(key) if markers is not None and previous is not None else (None, None)
        )
        ranks = [*state.thresholds, None, None][:2]
        values = [
            exp.Literal.string(key),
            *(
                exp.cast(exp.Literal.number(value) if value is not None else exp.null(), "bigint")
                for value in (state.keep, state.window, *ranks, state.last_shift)
            ),
            exp.cast(after if after is not None else exp.Literal.number(0), "bigint"),
            exp.cast(incremental if incremental is not None else exp.false(), "boolean"),
            exp.cast(context.evaluation_time.copy(), "timestamptz"),
            exp.cast(exp.Literal.number(number), "bigint"),
        ]
        # The verdict at this "now", from the kept times: those at or before "now" (`past`) are
        # exactly the counted ones, the most recent `keep` of them, newest first.
        verdict = _state_test(
            condition, context, exp.func("len", exp.column("past")), _template("past[1]")
        )
        tests.append(f"when {number} then {sql(verdict)}")
        rows.append("(" + ", ".join(sql(value) for value in values) + ")")
        # The new events of this condition per user: those stamped after "now", and the `keep`
        # most recent at or before it inside the window (newest first). Aggregates of constants
        # per condition: no per-row list work, and no user id (read from raw.event_users).
        # In a relative window only the events after its start matter (those after "now" and
        # those that count): an older one can never count again, as "now" only moves forward.
        # Filtered in the scan, the time-ordered log's zone maps skip the older events, and a
        # user with none of them gets no row (no row and an empty one mean the same).
        counts = f"event_at <= {now}"
        inside = (
            f" and event_at > {now} + to_minutes(cast({int(state.window)} as bigint))"
            if state.window is not None
            else ""
        )
        past = (
            f"case when max(event_at) filter (where {counts}) is null then {_EMPTY_TIMES} "
            f"else [max(event_at) filter (where {counts})] end"
            if state.keep == 1
            else f"coalesce(max(event_at, {int(state.keep)}) filter (where {counts}), "
            f"{_EMPTY_TIMES})"
        )
        qualifying.append(
            f"select {sql(exp.Literal.string(key))} as state_key, user_number, "
            f"coalesce(list(event_at) filter (where event_at > {now}), {_EMPTY_TIMES}) as future, "
            f"{past} as past from (select event_seq, user_number, "
            'event as event_name, "timestamp" as event_at, '
            f"properties as event_properties from {table}) as counted_events "
            f"where event_seq > {sql(values[6])} and event_seq <= {sql(through)} "
            f"and {sql(_state_qualifies(state, context))}{inside} group by user_number"
        )
    if not rows:
        return (
            "select cast(null as varchar) as state_key, cast(null as bigint) as user_number, "
            f"{_EMPTY_TIMES} as times, "
            "cast(null as timestamptz) as next_change, cast(null as timestamptz) as due_at, "
            "cast(null as bigint) as events_through, cast(null as timestamptz) as evaluated_at, "
            "cast(null as boolean) as holds, cast(null as timestamptz) as changed_at where false"
        )
    due_at = sql(exp.cast(due if due is not None else exp.null(), "timestamptz"))
    marker = EVENT_STATE_MARKER
    fresh = " union all ".join(qualifying)
    if previous is None:
        merged = (
            f"select *, {due_at} as due_at, false as previous_found, "
            "cast(null as boolean) as previous_holds, "
            "cast(null as timestamptz) as previous_changed_at from fresh"
        )
        previous_cte = ""
    else:
        table_sql = sql(previous)
        incremental_keys = "select state_key from parameters where incremental"
        columns = "state_key, user_number, times, next_change, due_at, holds, changed_at"
        # Two selects, each a filter DuckDB checks in the scan: the due rows by `next_change`,
        # the rows with new events by their (key, number) pairs, less the due ones (a row in
        # both comes once, without a window over the two). Any other filter in the first scan
        # (the keys kept incrementally) made DuckDB read every row: it applies to the few rows
        # found; the pairs' scan reads every row's keys anyway. The pairs are joined as
        # distinct pairs, not by a semi join: DuckDB built the semi join's hash table on the
        # whole state (4 of 5 CPU s at 1M users), the inner join on the pairs. The users' join
        # comes first: on one integer DuckDB filters the scan by the join's keys and hands on
        # only those users' rows (at 1M users, 5M events and 1% new: 311k of 4.3M rows; the
        # statement 0.61 -> 0.54 CPU s), which the (key, number) pairs then narrow.
        kept_columns = (
            ", ".join(f"kept_rows.{column}" for column in ("state_key", "user_number"))
            + ", times, next_change, due_at, holds, changed_at"
        )
        previous_cte = (
            f"previous as (select * from (select {columns} from {table_sql} "
            f"where next_change <= {now} union all select {kept_columns} "
            f"from {table_sql} as kept_rows "
            "join (select distinct user_number from fresh) as fresh_users "
            "on fresh_users.user_number = kept_rows.user_number "
            "join (select distinct state_key, user_number from fresh) as fresh_pairs "
            "on fresh_pairs.state_key = kept_rows.state_key "
            "and fresh_pairs.user_number = kept_rows.user_number "
            f"where kept_rows.next_change is null or kept_rows.next_change > {now}) as found "
            f"where user_number <> {marker} and state_key in ({incremental_keys})), "
        )
        # The kept times of those users, split again at this "now" (a few rows), merged with
        # their new events: a late event merges like any other.
        merged = (
            "select coalesce(previous.state_key, fresh.state_key) as state_key, "
            "coalesce(previous.user_number, fresh.user_number) as user_number, "
            f"list_sort(list_concat(list_filter(coalesce(previous.times, {_EMPTY_TIMES}), "
            "lambda t: t > state_now), "
            f"coalesce(fresh.future, {_EMPTY_TIMES})), 'DESC') as future, "
            f"list_sort(list_concat(list_filter(coalesce(previous.times, {_EMPTY_TIMES}), "
            "lambda t: t <= state_now and (window_minutes is null "
            "or t > state_now + to_minutes(window_minutes))), "
            f"coalesce(fresh.past, {_EMPTY_TIMES})), 'DESC') as past, "
            f"case when previous.next_change <= {now} then previous.next_change "
            "when previous.state_key is not null then previous.due_at "
            "when parameters.incremental then null "
            f"else {due_at} end as due_at, "
            "previous.state_key is not null as previous_found, "
            "previous.holds as previous_holds, previous.changed_at as previous_changed_at "
            "from previous full outer join fresh "
            "on previous.state_key = fresh.state_key "
            "and previous.user_number = fresh.user_number "
            "join parameters on parameters.state_key = "
            "coalesce(previous.state_key, fresh.state_key)"
        )
    return (
        f"with parameters({_STATE_PARAMETERS}) as (values {', '.join(rows)}), "
        f"fresh as ({fresh}), {previous_cte}"
        f"merged as ({merged}), "
        "kept as (select merged.state_key, user_number, due_at, list_sort(future, 'DESC') as future, "
        "list_slice(past, 1, keep) as past, window_minutes, rank_a, rank_b, last_shift, "
        "test_number, incremental, previous_found, previous_holds, previous_changed_at "
        "from merged join parameters on parameters.state_key = merged.state_key), "
        # The verdict at this "now" (`holds`, which audience_members reads while it is current),
        # and `changed_at`, the latest build that changed it, which int_event_users_to_reevaluate
        # lists: a row new to the state changed it if it holds (no row holds nothing), a row kept
        # before the column existed did. A condition recomputed whole has `due_at`'s.
        "judged as (select *, coalesce(case test_number "
        + " ".join(tests)
        + " end, false) as holds from kept) "
        "select state_key, user_number, list_concat(future, past) as times, "
        "least(list_min(future), "
        "past[rank_a] - to_minutes(window_minutes), "
        "past[rank_b] - to_minutes(window_minutes), "
        "case when past[1] - to_minutes(last_shift) + to_microseconds(cast(1 as bigint)) "
        f"> {now} then past[1] - to_minutes(last_shift) "
        "+ to_microseconds(cast(1 as bigint)) end"
        ") as next_change, "
        f"due_at, {sql(through)} as events_through, {now} as evaluated_at, holds, "
        "case when not incremental then due_at "
        "when previous_found and previous_holds is null then "
        f"{now} when holds <> coalesce(previous_holds, false) then {now} "
        "else previous_changed_at end as changed_at from judged "
        f"union all select state_key, {marker}, {_EMPTY_TIMES}, null, null, "
        f"{sql(through)}, {now}, null, null from parameters"
    )


def _state_test(
    condition: Condition, context: CompileContext, count: exp.Expression, last: exp.Expression
) -> exp.Expression:
    """What a state row of this condition is tested for, given the user's `count` of counted
    events at "now" (exact up to the state's `keep`) and their `last` qualifying time at or
    before "now" (null when none): for `performed`, the count's comparison with N ("at most N"
    and "exactly 0" as its negation, "more than N", which no row fails as no row has no event);
    for `last_performed_*`, the last time's comparison with the bound. A user without a row
    never passes it."""
    argument = event_argument(condition)
    if condition.operator == "performed":
        kind, number = argument.count
        if kind == "at_most" or (kind == "exactly" and number == 0):
            return exp.GT(this=count, expression=exp.Literal.number(number))
        return _COUNT_COMPARISONS[kind](this=count, expression=exp.Literal.number(number))
    comparison = exp.LT if condition.operator == "last_performed_before" else exp.GTE
    return comparison(this=last, expression=time_argument_sql(argument.time, context))


def _state_users(
    condition: Condition, state: EventState, context: CompileContext
) -> exp.Expression:
    """The user is among those whose state row of this condition passes `_state_test`: the
    row's `holds`, which its build computed at its "now", while that verdict is still current
    (kept at or before this "now", its next change after it); otherwise (a row kept before the
    column existed, or a state not built at this "now") the test over its kept `times`."""
    # "Now" as a column: in a lambda DuckDB binds columns but not subqueries (dbt's "now" is one).
    now = exp.column(_STATE_NOW)
    rows = exp.select(exp.Star(), exp.alias_(context.evaluation_time.copy(), _STATE_NOW)).from_(
        context.event_state.copy()
    )
    count = _template(
        "len(list_filter(times, lambda t: :counts))", counts=_counts_now(state, now.copy())
    )
    last = _template("list_max(list_filter(times, lambda t: t <= :now))", now=now.copy())
    current = _template(
        "holds is not null and evaluated_at <= :now "
        "and (next_change is null or next_change > :now)",
        now=now.copy(),
    )
    test = exp.Case(
        ifs=[exp.If(this=current, true=exp.column("holds"))],
        default=_state_test(condition, context, count, last),
    )
    users = (
        exp.select(exp.column("user_id"))
        .from_(rows.subquery("state_rows"))
        .where(
            exp.and_(
                exp.column("state_key").eq(exp.Literal.string(state.key)),
                exp.column("user_number").neq(exp.Literal.number(EVENT_STATE_MARKER)),
                test,
            )
        )
    )
    return exp.In(this=context.user_id, query=exp.paren(users))


def _performed_from_state(
    condition: Condition, state: EventState, kind: str, number: int, context: CompileContext
) -> exp.Expression:
    """`performed`'s verdict from the user's state row: "at most N" (and "exactly 0") is not
    being among the users with more than N."""
    if kind == "at_most" or (kind == "exactly" and number == 0):
        more = _state_users(condition, state, context)
        return exp.not_(exp.func("coalesce", exp.paren(more), exp.false()))
    return _state_users(condition, state, context)


def event_summary(condition: Condition, context: CompileContext, ids: int = 3) -> exp.Expression:
    """What an event condition counted for one user (for `explain`), as one struct: the number of
    events (`event_count`), the first and last timestamps, and the newest `ids` message ids. For
    `performed`, the events in its window; for `last_performed_*`, every event that qualifies."""
    query, _ = _counted_events(condition, context)
    summary = _template(
        "{'event_count': count(*), 'first_at': min(event_at), 'last_at': max(event_at), "
        "'message_ids': list(event_message_id order by event_at desc, event_message_id)[1:(:ids)]}",
        ids=exp.Literal.number(ids),
    )
    return exp.Subquery(this=query.select(summary))


@dataclass(frozen=True)
class EventWindow:
    """An event condition's comparison of `event`'s times with "now" shifted by `minutes`.

    As "now" moves from t0 to t1, an event condition can only change its verdict for a user who has
    an event named `event` stamped between t0 + minutes and t1 + minutes, for one of its windows:
    shift 0 (an event that "now" reaches starts to count) and each relative bound (an event leaves
    "the last 7 days" when now passes its time plus 7 days). Its where filters only narrow the
    events, so they are left out: the users found are a superset of those whose verdict changes.
    """

    event: str
    minutes: int


def event_windows(segments: Iterable[Iterable[Condition]]) -> list[EventWindow] | None:
    """Every `EventWindow` of these conditions, sorted; None when a `where` compares an event
    property with "now" (that verdict moves with the property, not the event's time, and the
    audience is evaluated whole)."""
    windows: set[EventWindow] = set()
    compares_now: list[TimeWindow] = []
    context = replace(_recording_context(), on_time_window=compares_now.append)
    for segment in segments:
        for condition in segment:
            if condition.operator not in EXTENSION_OPERATORS:
                continue
            argument = event_argument(condition)
            nested = replace(_event_property_context(context), on_time_window=compares_now.append)
            for where in argument.where:
                compile_condition(where, nested)
            bounds = [argument.time]
            if isinstance(argument.window, tuple):
                bounds += list(argument.window)
            else:
                bounds.append(argument.window)
            windows.add(EventWindow(argument.event, 0))
            windows |= {
                EventWindow(argument.event, bound.minutes)
                for bound in bounds
                if isinstance(bound, RelativeTime)
            }
    if compares_now:
        return None
    return sorted(windows, key=lambda window: (window.event, window.minutes))


def reads_events(segments: Iterable[Iterable[Condition]]) -> bool:
    """True when some condition counts events (an extension operator)."""
    return any(
        condition.operator in EXTENSION_OPERATORS for segment in segments for condition in segment
    )


_COMPILERS = {
    "equal_to": _compile_equal_to,
    "greater_than": _compile_ordering,
    "greater_than_or_equal_to": _compile_ordering,
    "less_than": _compile_ordering,
    "less_than_or_equal_to": _compile_ordering,
    "is_between": _compile_is_between,
    "contains": _compile_contains,
    "contains_all": _compile_contains_all,
    "empty": _compile_empty,
    "exists": _compile_exists,
    "is_timestamp_before": _compile_time_compare,
    "is_timestamp_on_or_after": _compile_time_compare,
    "is_timestamp_before_date": _compile_time_compare,
    "is_timestamp_on_or_after_date": _compile_time_compare,
    "is_timestamp_between": _compile_time_between,
    "is_timestamp_before_now": _compile_now_compare,
    "is_timestamp_on_or_after_now": _compile_now_compare,
    "is_timestamp": _compile_is_timestamp,
    "is_audience_member": _compile_audience_member,
    "is_in_random_cohort": _compile_random_cohort,
    "performed": lambda condition, read, context: _compile_performed(condition, context),
    "last_performed_before": lambda condition, read, context: _compile_last_performed(
        condition, context
    ),
    "last_performed_after": lambda condition, read, context: _compile_last_performed(
        condition, context
    ),
}


def attributes_used(segments: Iterable[Iterable[Condition]]) -> set[Attribute]:
    """Every attribute of the user the conditions read, found by compiling them against a
    recording reader (a tenant's or membership's attributes are read from their JSON)."""
    used: set[Attribute] = set()

    def record(attribute: Attribute) -> exp.Expression:
        used.add(attribute)
        return exp.column(attribute.column_name, quoted=True)

    context = CompileContext(
        attribute=record,
        audience_members=lambda key: exp.select("user_key").from_("members"),
        evaluation_time=exp.column("now"),
        user_key=exp.column("user_key"),
        user_id=exp.column("user_id"),
        pair_attribute=pair_attribute,
    )
    compile_segments(segments, context)
    return used


def time_windows(segments: Iterable[Iterable[Condition]]) -> list[TimeWindow]:
    """Every comparison with the evaluation time in these conditions (see `TimeWindow`), sorted."""
    windows: set[TimeWindow] = set()
    context = CompileContext(
        attribute=lambda attribute: exp.column(attribute.column_name, quoted=True),
        audience_members=lambda key: exp.select("user_key").from_("members"),
        evaluation_time=exp.column("now"),
        user_key=exp.column("user_key"),
        user_id=exp.column("user_id"),
        on_time_window=windows.add,
        pair_attribute=pair_attribute,
    )
    compile_segments(segments, context)
    return sorted(windows, key=window_order)


def window_order(window: TimeWindow) -> tuple:
    """The order time windows are listed in (scope, path, minutes): generated files are stable."""
    return (window.attribute.scope, window.attribute.path, window.minutes)


# ---------------------------------------------------------------------------------------------
# Rendering.


def render(expression: exp.Expression, pretty: bool = True, dialect: str = DIALECT) -> str:
    """Readable SQL in `dialect`: formatted, with lower-case keywords and function names.

    The compiler's trees are written in DuckDB's terms; for Spark, `_for_spark` first rewrites the
    few constructs SQLGlot's transpiler writes wrong or leaves in DuckDB's words.
    """
    if dialect not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r}; known: {', '.join(DIALECTS)}")
    if dialect == SPARK:
        expression = _for_spark(expression.copy())
    sql = expression.sql(dialect=dialect, pretty=pretty, normalize_functions="lower")
    return lowercase_keywords(sql, dialect)


def _for_spark(tree: exp.Expression) -> exp.Expression:
    """DuckDB constructs of the compiler's templates, in Spark's words with the same meaning."""

    def rewrite(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Length):  # `len` of a list (the compiler takes no text's length)
            return exp.Anonymous(this="size", expressions=[node.this])
        if isinstance(node, exp.ArrayOverlaps):  # list_has_any: SQLGlot writes `&&`
            return exp.Anonymous(this="arrays_overlap", expressions=[node.this, node.expression])
        name = node.name.lower() if isinstance(node, exp.Anonymous) else ""
        if name == "list_has_all":  # every key of the second list is in the first
            items, keys = node.expressions
            missing = exp.Anonymous(this="array_except", expressions=[keys, items])
            return exp.EQ(
                this=exp.Anonymous(this="size", expressions=[missing]),
                expression=exp.Literal.number(0),
            )
        if name == "to_minutes":
            return exp.Mul(
                this=node.expressions[0],
                expression=exp.Interval(this=exp.Literal.string("1"), unit=exp.Var(this="MINUTE")),
            )
        if (
            isinstance(node, exp.Cast)
            and node.to.is_type(exp.DataType.Type.UBIGINT)
            and isinstance(node.this, exp.DPipe)
            and node.this.this == exp.Literal.string("0x")
        ):  # hexadecimal text to an integer (random cohorts)
            digits = node.this.expression
            converted = exp.Anonymous(
                this="conv",
                expressions=[digits, exp.Literal.number(16), exp.Literal.number(10)],
            )
            return exp.cast(converted, "bigint")
        return node

    return tree.transform(rewrite)


def lowercase_keywords(sql: str, dialect: str = DIALECT) -> str:
    """Lower-case SQL keywords in place, leaving strings, identifiers and comments untouched."""
    from sqlglot.tokens import TokenType

    tokens = sqlglot.Dialect.get_or_raise(dialect).tokenize(sql)
    # Unquoted names (VAR) are case-insensitive, so lower-casing them is safe too.
    keep = {
        TokenType.STRING,
        TokenType.IDENTIFIER,
        TokenType.NATIONAL_STRING,
        TokenType.PLACEHOLDER,
    }
    pieces, position = [], 0
    for token in tokens:
        if token.token_type in keep or not token.text.isupper():
            continue
        start, end = token.start, token.end + 1
        if sql[start:end] != token.text:
            continue
        pieces.append(sql[position:start])
        pieces.append(token.text.lower())
        position = end
    pieces.append(sql[position:])
    return "".join(pieces)
