"""The columns `int_users_flattened` gains when a definition starts reading a new property.

A new property's columns are added to the table in place, before the model's incremental build
(its pre-hook, the generated macro `add_flattened_columns` in `macros/generated/`): one JSON
column per new property filled with one parse of every user's document (an `UPDATE` of a
VARCHAR-like column, which DuckDB does in place), then each typed column derived from it by
`ALTER TABLE ... ALTER COLUMN ... USING` (a rewrite of that column alone), then the JSON columns
dropped. No other column of any row is read or written again, so adding a property costs about
one parse of every user's JSON (`bench/new_property.py`). Updating a list column (`__items`)
directly would make DuckDB delete and insert every row instead, which is what this avoids.
"""

from __future__ import annotations

import json

from sqlglot import exp

from audiences.conditions.compiler import (
    Attribute,
    attribute_expression,
    json_pointer,
    property_slug,
    render,
)

ADDED_COLUMNS_MACRO = "add_flattened_columns"
# Each variant's column type: what the model's own extraction gives (a cold build), so that the
# schema check of the incremental build finds nothing to change.
COLUMN_TYPES = {
    "json": "json",
    "kind": "varchar",
    "text": "varchar",
    "number": "double",
    "boolean": "boolean",
    "items": "varchar[]",
    "timestamp": "timestamptz",
}
# A property's JSON value while its columns are added: no column of the model ends in this
# (theirs end in a variant's name).
VALUE_SUFFIX = "__added"


def added_columns_macro(attributes: list[Attribute], header: str) -> str:
    """The macro `add_flattened_columns`: SQL that adds to an existing `int_users_flattened` the
    columns of these attributes that it lacks (nothing on a first or full build). Property names
    enter only as SQL literals and as column names made of `property_slug`'s characters."""
    from audiences.dbt.models import escape_jinja

    by_path: dict[tuple[str, ...], list[Attribute]] = {}
    for attribute in attributes:
        by_path.setdefault(attribute.path, []).append(attribute)
    # `id` is read from the table's own user_id column: no JSON to parse for it.
    parsed = [path for path in sorted(by_path) if path != ("id",)]
    wanted = json.dumps([attribute.column_name for attribute in attributes])
    reads = (
        "{\n"
        + ",\n".join(
            f"        {json.dumps(_value_column(path))}: "
            f"{json.dumps([a.column_name for a in by_path[path]])}"
            for path in parsed
        )
        + "\n    }"
        if parsed
        else "{}"
    )
    # The pointers of the new properties, in the order of `values` (a comma before all but the first).
    pointers = "".join(
        f"\n            {{% if {json.dumps(_value_column(path))} in values %}}"
        f"{{{{ ', ' if values.index({json.dumps(_value_column(path))}) else '' }}}}"
        f"{escape_jinja(render(exp.Literal.string(json_pointer(path))))}{{% endif %}}"
        for path in parsed
    )
    columns = []
    for attribute in attributes:
        name = attribute.column_name
        if attribute.path == ("id",):
            value = _template_value("to_json(user_id)")
        else:
            value = exp.Column(this=exp.to_identifier(_value_column(attribute.path), quoted=True))
        expression = escape_jinja(render(attribute_expression(value, attribute.variant)))
        columns.append(
            f"    {{% if {json.dumps(name)} in missing %}}\n"
            f'    alter table {{{{ this }}}} add column "{name}" {COLUMN_TYPES[attribute.variant]};\n'
            f'    alter table {{{{ this }}}} alter column "{name}"\n'
            f"    set data type {COLUMN_TYPES[attribute.variant]}\n"
            f"    using {_indent(expression, 4)};\n"
            f"    {{% endif %}}"
        )
    return f"""{header}

{{% macro {ADDED_COLUMNS_MACRO}() -%}}

    {{#- int_users_flattened's pre-hook: the columns of the properties a definition started reading
        since the last build, added to every row in place (audiences/dbt/flattened.py). The
        model's build then extracts every column of the users who changed, as always, and drops
        the columns no definition reads any more. -#}}
    {{%- set existing = column_names(this) if execute and is_incremental() else [] -%}}
    {{%- set missing = {wanted} | reject('in', existing) | list if existing else [] -%}}
    {{%- set reads = {reads} -%}}
    {{%- set values = [] -%}}
    {{%- for value, names in reads.items() if names | select('in', missing) | list -%}}
        {{%- do values.append(value) -%}}
    {{%- endfor -%}}

    {{% if values %}}
    {{#- one parse of every user's JSON for the new properties, into a JSON column each -#}}
    {{% for value in values %}}
    alter table {{{{ this }}}} add column "{{{{ value }}}}" json;
    {{% endfor %}}
    update {{{{ this }}}} as flattened
    set {{% for value in values %}}"{{{{ value }}}}" = list_extract(extracted.property_values, {{{{ loop.index }}}}){{{{ ', ' if not loop.last else '' }}}}{{% endfor %}}
    from (
        select
            user_key,
            json_extract(properties, [{pointers}
            ]) as property_values
        from {{{{ ref('stg_warehouse__users') }}}}
        where not is_deleted
    ) as extracted
    where flattened.user_key = extracted.user_key;
    {{% endif %}}

{chr(10).join(columns)}

    {{% for value in values %}}
    alter table {{{{ this }}}} drop column "{{{{ value }}}}";
    {{% endfor %}}

{{%- endmacro %}}
"""


def _value_column(path: tuple[str, ...]) -> str:
    return property_slug(path) + VALUE_SUFFIX


def _template_value(sql: str) -> exp.Expression:
    return exp.maybe_parse(sql, dialect="duckdb")


def _indent(text: str, spaces: int) -> str:
    return text.replace("\n", "\n" + " " * spaces)
