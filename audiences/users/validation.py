"""Row-level validation of incoming users (pandera on polars), and the patch each good row becomes.

A row with a missing or malformed id, or a field that cannot be read, is *quarantined*: kept with
its row number, the reasons and the raw values, never silently dropped and never the reason a load
fails. Every other row becomes an identify-style JSON patch (Knock's user object minus `id`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandera.polars as pa
import polars as pl

from audiences.identifiers import CONTROL_CHARACTERS, MAX_ID_LENGTH
from audiences.users.sources import ROW_COLUMN, UNREADABLE_COLUMN

REPLACEMENT_CHARACTER = "\ufffd"
UNREADABLE_TEXT = "has bytes that are not valid text"


@dataclass(frozen=True)
class ValidatedRows:
    """Rows that passed (`valid`: `_row`, `user_id`, `patch`) and those quarantined."""

    valid: pl.DataFrame
    quarantined: pl.DataFrame  # _row, user_id, reason, raw_row


def _check(name: str, message: str, expression) -> pa.Check:
    return pa.Check(
        lambda data: data.lazyframe.select(expression(pl.col(data.key))), name=name, error=message
    )


def _is_json_object(value: str | None) -> bool:
    if value is None:
        return True
    try:
        return isinstance(json.loads(value, parse_constant=_not_json), dict)
    except ValueError:
        return False


def _not_json(constant: str) -> None:
    """`NaN` and `Infinity` are not JSON, though Python's parser reads them."""
    raise ValueError(f"{constant} is not JSON")


def _id_column(name: str) -> pa.Column:
    """The checks of an id column (`id`, or a membership's `user_id` and `tenant_id`): the rules of
    `audiences/identifiers.py` as polars expressions (Knock's '/' and '#' are the API's to refuse)."""
    return pa.Column(
        str,
        nullable=False,
        checks=[
            _check(f"blank_{name}", f"{name} is blank", lambda c: c.str.strip_chars() != ""),
            _check(
                f"padded_{name}",
                f"{name} has leading or trailing whitespace",
                lambda c: (c.str.strip_chars() == c) | (c.str.strip_chars() == ""),
            ),
            _check(
                f"long_{name}",
                f"{name} is longer than {MAX_ID_LENGTH} characters",
                lambda c: c.str.len_chars() <= MAX_ID_LENGTH,
            ),
            _check(
                f"control_characters_in_{name}",
                f"{name} contains control characters",
                lambda c: ~c.str.contains(CONTROL_CHARACTERS),
            ),
        ],
    )


def users_schema(frame: pl.DataFrame, id_columns: tuple[str, ...] = ("id",)) -> pa.DataFrameSchema:
    """The pandera schema for a frame of incoming users, tenants or memberships (`id_columns` name
    the row; its columns decide the per-column checks)."""
    columns = {name: _id_column(name) for name in id_columns}
    if frame.schema.get("properties") == pl.String:
        columns["properties"] = pa.Column(
            pl.String,
            nullable=True,
            checks=[
                _check(
                    "properties_not_object",
                    "`properties` is not a JSON object",
                    lambda c: c.map_elements(_is_json_object, return_dtype=pl.Boolean),
                )
            ],
        )
    return pa.DataFrameSchema(columns, strict=False, coerce=False)


def unreadable_text(frame: pl.DataFrame) -> dict[int, list[str]]:
    """Per row index, a reason for each text column whose cell has bytes that are not valid text
    (decoding replaced them). One pass over every column at once: as a pandera check per column,
    a file with thousands of columns took minutes, since pandera reads the frame's whole schema
    once per column."""
    names = [
        name
        for name, dtype in frame.schema.items()
        if dtype == pl.String and name not in ("id", ROW_COLUMN)
    ]
    if not names:
        return {}
    flagged = pl.col(names).str.contains(REPLACEMENT_CHARACTER, literal=True).fill_null(False)
    rows = frame.with_row_index("_index").filter(pl.any_horizontal(flagged))
    reasons: dict[int, list[str]] = {}
    for row in rows.select("_index", *names).iter_rows():
        reasons[row[0]] = [
            f"`{name}` {UNREADABLE_TEXT}"
            for name, value in zip(names, row[1:], strict=True)
            if value is not None and REPLACEMENT_CHARACTER in value
        ]
    return reasons


def validate_users(
    frame: pl.DataFrame,
    empty_cells: str = "remove",
    keep_last_duplicate: bool = False,
    id_columns: tuple[str, ...] = ("id",),
) -> ValidatedRows:
    """Split rows into valid patches and quarantined rows with their reasons: `check_users`, then
    `row_patches` of the rows that passed (see both).

    `empty_cells` says what a null cell means in the patch: "remove" (a source's rows: the
    property is removed, Knock's identify rule) or "skip" (an upload's rows: not given).
    """
    passed, quarantined = check_users(frame, keep_last_duplicate, id_columns)
    not_properties = [name for name in id_columns if name != "id"]
    return ValidatedRows(row_patches(passed.drop(not_properties), empty_cells), quarantined)


def check_users(
    frame: pl.DataFrame,
    keep_last_duplicate: bool = False,
    id_columns: tuple[str, ...] = ("id",),
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The rows that pass (as given, ids as text) and the quarantined rows with their reasons;
    `validate_users` without building the patches (an upload builds them after acknowledging).

    With `keep_last_duplicate` (a snapshot, which holds each user once), an id on several valid
    rows keeps its last row; the earlier ones are quarantined with the rows and the one kept named.
    Otherwise such rows all apply in order, like consecutive identify calls (a stream).
    A row that `read_source` found unreadable (`UNREADABLE_COLUMN`) is quarantined with that reason,
    which names the file, the line and the encoding expected.
    `id_columns` are the columns checked as ids: a membership's `user_id` and `tenant_id` (its
    `id`, both as a JSON object, is built from them by `read_source`); they are not properties."""
    for name in {"id", *id_columns}:
        if frame.schema.get(name) != pl.String:
            frame = frame.with_columns(pl.col(name).cast(pl.String))
    unreadable_lines = frame[UNREADABLE_COLUMN] if UNREADABLE_COLUMN in frame.columns else None
    if unreadable_lines is not None:
        frame = frame.drop(UNREADABLE_COLUMN)
    reasons: dict[int, list[str]] = {}
    try:
        users_schema(frame, id_columns).validate(frame, lazy=True)
    except pa.errors.SchemaErrors as errors:
        cases = errors.failure_cases
        for index, check, column in cases.select("index", "check", "column").iter_rows():
            if index is None:
                raise ValueError(
                    f"the source as a whole is unreadable: column {column}: {check}"
                ) from None
            missing = check == "not_nullable" and column in id_columns
            reason = f"{column} is missing" if missing else check
            reasons.setdefault(index, [])
            if reason not in reasons[index]:
                reasons[index].append(reason)
    for index, unreadable in unreadable_text(frame).items():
        reasons.setdefault(index, []).extend(unreadable)
    if unreadable_lines is not None:
        for index, problem in enumerate(unreadable_lines):
            if problem is not None:  # the file's own reason replaces the generic one
                reasons[index] = [problem] + [
                    reason
                    for reason in reasons.get(index, [])
                    if not reason.endswith(UNREADABLE_TEXT)
                ]
    if keep_last_duplicate:
        reasons.update(_earlier_duplicates(frame, reasons))
    bad = pl.Series("bad", [i in reasons for i in range(frame.height)], dtype=pl.Boolean)
    quarantined = _quarantine_rows(frame.filter(bad), [reasons[i] for i in sorted(reasons)])
    return frame.filter(~bad), quarantined


def _earlier_duplicates(frame: pl.DataFrame, reasons: dict[int, list[str]]) -> dict[int, list[str]]:
    """The reasons of the rows that a later valid row with the same id replaces (by position)."""
    valid = (
        frame.select(pl.col("id"), pl.col(ROW_COLUMN))
        .with_row_index("position")
        .filter(~pl.col("position").is_in(list(reasons)))
    )
    repeated = valid.filter(pl.col("id").is_duplicated()).sort("position")
    found: dict[int, list[str]] = {}
    for (user_id,), rows in repeated.group_by("id", maintain_order=True):
        numbers = rows[ROW_COLUMN].to_list()
        listed = ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
        for position in rows["position"].to_list()[:-1]:
            found[position] = [
                f"duplicate id {user_id!r} on rows {listed}: the last (row {numbers[-1]}) "
                "was loaded, this row was not"
            ]
    return found


def _quarantine_rows(frame: pl.DataFrame, reasons: list[list[str]]) -> pl.DataFrame:
    raw_rows = [
        json.dumps(row, ensure_ascii=False, default=str)
        for row in frame.drop(ROW_COLUMN).iter_rows(named=True)
    ]
    return pl.DataFrame(
        {
            ROW_COLUMN: frame[ROW_COLUMN],
            "user_id": frame["id"],
            "reason": ["; ".join(r) for r in reasons],
            "raw_row": raw_rows,
        },
        schema={
            ROW_COLUMN: pl.Int64,
            "user_id": pl.String,
            "reason": pl.String,
            "raw_row": pl.String,
        },
    )


def row_patches(frame: pl.DataFrame, empty_cells: str = "remove") -> pl.DataFrame:
    """One JSON patch per row: columns by name, dotted names nested, `properties` merged under them.

    With `empty_cells="remove"`, a null cell is a JSON `null` in the patch, which removes the
    property (Knock's identify rule); a nested object none of whose cells is given is left out, so
    that an empty `a.b` never creates an empty object `a`. With "skip", a null cell is left out of the patch, and so is
    a nested object with no given cell: a row with no given cell has the patch `{}`.
    """
    if empty_cells not in ("remove", "skip"):
        raise ValueError(f"empty_cells is remove or skip, not {empty_cells!r}")
    fields = [name for name in frame.columns if name not in ("id", ROW_COLUMN, "properties")]
    frame = _plain_types(frame)
    tree: dict = {}
    for name in fields:
        node = tree
        parts = name.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # `a` and `a.b` both given: the plain column wins
                break
            node = child
        else:
            node.setdefault(parts[-1], name)

    def build(node: dict, top: bool = False) -> pl.Expr:
        children = [
            (build(value) if isinstance(value, dict) else pl.col(value)).alias(key)
            for key, value in node.items()
        ]
        if empty_cells == "remove" or top:
            return pl.struct(children)
        # a nested object with no given cell is null, so that it is left out below
        return pl.when(pl.any_horizontal([child.is_not_null() for child in children])).then(
            pl.struct(children)
        )

    def cells(node: dict) -> list[str]:
        return [n for v in node.values() for n in (cells(v) if isinstance(v, dict) else [v])]

    def removing(node: dict, top: bool = False) -> pl.Expr:
        """The object's JSON text, null cells as `null`; a nested object none of whose cells is
        given is left out (null), so that an empty cell removes a property and never creates the
        object that would hold it (`{"a": {"b": null}}` merged into `{}` is `{"a": {}}`)."""
        members = [
            pl.lit(json.dumps(key) + ":") + removing(value)
            if isinstance(value, dict)
            else pl.struct(pl.col(value).alias(key)).struct.json_encode().str.slice(1).str.head(-1)
            for key, value in node.items()
        ]
        text = pl.lit("{") + pl.concat_str(members, separator=",", ignore_nulls=True) + pl.lit("}")
        if top:
            return text
        return pl.when(pl.any_horizontal([pl.col(n).is_not_null() for n in cells(node)])).then(text)

    if not tree:
        columns_json = pl.lit("{}")
    elif empty_cells == "remove":
        columns_json = removing(tree, top=True)
    else:
        columns_json = build(tree, top=True).struct.json_encode()
    if empty_cells == "skip" and tree:
        # json_encode writes null fields; dropping them is one JSON merge into an empty object
        columns_json = _without_nulls(columns_json)
    patches = frame.select(
        pl.col(ROW_COLUMN),
        pl.col("id").alias("user_id"),
        columns_json.alias("columns_patch"),
        (
            pl.col("properties") if "properties" in frame.columns else pl.lit(None, dtype=pl.String)
        ).alias("properties_patch"),
    )
    return patches


def _without_nulls(json_text: pl.Expr) -> pl.Expr:
    """The JSON objects without their null members, at every depth (RFC 7396: merging a patch into
    `{}` drops its nulls), through DuckDB's `json_merge_patch`, the rule the loader applies."""
    import duckdb

    def strip(texts: pl.Series) -> pl.Series:
        with duckdb.connect() as connection:
            connection.register("texts", pl.DataFrame({"text": texts}).to_arrow())
            return connection.sql(
                "select json_merge_patch('{}', text::json)::varchar as text from texts"
            ).pl()["text"]

    return json_text.map_batches(strip, return_dtype=pl.String)


def _plain_types(frame: pl.DataFrame) -> pl.DataFrame:
    """Types JSON can carry: times as ISO 8601 UTC strings, decimals as floats, the rest as text."""
    conversions = []
    for name, dtype in frame.schema.items():
        column = pl.col(name)
        if isinstance(dtype, pl.Datetime):
            utc = (
                column.dt.convert_time_zone("UTC")
                if dtype.time_zone
                else column.dt.replace_time_zone("UTC")
            )
            conversions.append(utc.dt.strftime("%Y-%m-%dT%H:%M:%S%.fZ").alias(name))
        elif dtype == pl.Date:
            conversions.append(column.dt.strftime("%Y-%m-%d").alias(name))
        elif isinstance(dtype, pl.Decimal):
            conversions.append(column.cast(pl.Float64).alias(name))
        elif dtype in (pl.Time, pl.Binary, pl.Object, pl.Categorical) or isinstance(
            dtype, (pl.Enum, pl.Duration)
        ):
            conversions.append(column.cast(pl.String, strict=False).alias(name))
        elif name == "properties" and isinstance(dtype, pl.Struct):
            conversions.append(column.struct.json_encode().alias(name))
    return frame.with_columns(conversions) if conversions else frame
