"""Reading event sources (the `events:` list of `sources.yml`) and appending them to `raw.events`.

A source is JSON lines in Segment's track shape (`userId`, `event`, `timestamp`, `messageId`,
`properties`), Parquet files, or a DuckDB table or query. `columns` maps the five fields to the
source's own names, so a Segment or RudderStack warehouse `tracks` table is configuration:
`columns: {message_id: id, user_id: user_id, event: event, timestamp: timestamp, properties: null}`.

Loading is incremental: a file already loaded (same name, size and modification time) is not read
again, and a table with a `loaded_at_column` (its ingestion time) is read only past the newest value
loaded before. Whatever is read, a message id already in `raw.events` changes nothing. All of it is
SQL over DuckDB relations: values are bound or read from the files, names are quoted identifiers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb
import polars as pl
import yaml

from audiences.conditions.arguments import TIMESTAMP_PATTERN
from audiences.users.sources import lone_surrogate_problem, replace_lone_surrogates
from audiences.warehouse.schema import ensure_event_tables, number_event_users

FORMATS = ("jsonl", "parquet", "duckdb")
FIELDS = ("message_id", "user_id", "event", "timestamp", "properties")
# Segment's track call, as its JSON and as the event tables of Segment's and RudderStack's
# warehouse schemas spell it (set those with `columns:`).
SEGMENT_FIELDS = {
    "message_id": "messageId",
    "user_id": "userId",
    "event": "event",
    "timestamp": "timestamp",
    "properties": "properties",
}
# Shown in the quarantine per row: at most this much of the row's text.
RAW_TEXT_LIMIT = 2000


class EventSourceError(ValueError):
    """An event source that cannot be read at all; the message names the source and what is wrong."""


@dataclass(frozen=True)
class EventSource:
    """One declared source of events."""

    name: str
    format: str
    location: Path
    table: str | None = None
    query: str | None = None
    columns: dict = field(default_factory=lambda: dict(SEGMENT_FIELDS))
    loaded_at_column: str | None = None

    @property
    def description(self) -> str:
        what = self.query or self.table
        return f"{self.format} {self.location}" + (f" ({what})" if what else "")


def event_sources_from_file(path: Path) -> list[EventSource]:
    """The `events:` list of `sources.yml` (none when the file has no such list)."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise EventSourceError(f"{path}: cannot read the sources file ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise EventSourceError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    entries = document.get("events") if isinstance(document, dict) else None
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise EventSourceError(f"{path}: `events:` must be a list of event sources")
    sources = []
    for index, entry in enumerate(entries):
        where = f"{path}: events[{index}]"
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("path"):
            raise EventSourceError(f"{where} needs at least `name` and `path`")
        name = str(entry["name"])
        location = Path(entry["path"])
        location = location if location.is_absolute() else (path.parent / location).resolve()
        fmt = entry.get("format") or _guess_format(location, name)
        if fmt not in FORMATS:
            raise EventSourceError(
                f"{where} ({name}): format must be one of {', '.join(FORMATS)}, got {fmt!r}"
            )
        if fmt == "duckdb" and not (entry.get("table") or entry.get("query")):
            raise EventSourceError(f"{where} ({name}): a duckdb source needs `table` or `query`")
        columns = dict(SEGMENT_FIELDS)
        mapping = entry.get("columns") or {}
        if not isinstance(mapping, dict) or set(mapping) - set(FIELDS):
            raise EventSourceError(
                f"{where} ({name}): `columns` maps {', '.join(FIELDS)} to the source's names"
            )
        columns.update(mapping)
        for required in FIELDS[:4]:
            if not isinstance(columns[required], str) or not columns[required]:
                raise EventSourceError(f"{where} ({name}): `columns.{required}` must name a column")
        sources.append(
            EventSource(
                name,
                fmt,
                location,
                entry.get("table"),
                entry.get("query"),
                columns,
                entry.get("loaded_at_column"),
            )
        )
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise EventSourceError(f"{path}: event source names must be unique, got {names}")
    return sources


def _guess_format(location: Path, name: str) -> str:
    if location.is_dir():
        return "jsonl" if any(location.rglob("*.jsonl")) else "parquet"
    if location.suffix.lower() in (".parquet", ".pq"):
        return "parquet"
    if location.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if location.suffix.lower() == ".duckdb":
        return "duckdb"
    raise EventSourceError(
        f"{location}: cannot tell the format of event source {name!r}; set `format:`"
    )


def ensure_event_schema(connection: duckdb.DuckDBPyConnection) -> None:
    """Create `raw.events`, its quarantine and its load log if they are not there (idempotent)."""
    ensure_event_tables(connection)


@dataclass(frozen=True)
class EventLoadResult:
    source_name: str
    rows_read: int = 0
    events_loaded: int = 0
    duplicates: int = 0
    rows_quarantined: int = 0
    files_skipped: int = 0

    def as_metadata(self) -> dict[str, int]:
        return {key: value for key, value in self.__dict__.items() if key != "source_name"}

    def __str__(self) -> str:
        return (
            f"{self.rows_read} rows read, {self.events_loaded} events loaded, "
            f"{self.duplicates} duplicates, {self.rows_quarantined} quarantined"
            + (f", {self.files_skipped} files already loaded" if self.files_skipped else "")
        )


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _files(source: EventSource) -> list[Path]:
    if not source.location.exists():
        raise EventSourceError(
            f"{source.location}: no such file or folder (event source {source.name!r})"
        )
    if source.location.is_dir():
        pattern = "*.parquet" if source.format == "parquet" else "*.jsonl"
        return sorted(source.location.rglob(pattern))
    return [source.location]


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def _read_jsonl(source: EventSource, path: Path) -> pl.DataFrame:
    """One row per non-blank line: the mapped fields as text, the properties as JSON text, and a
    reason when the line cannot be used as it is (bad bytes, not JSON, not an object)."""
    rows = []
    names = source.columns
    for number, raw_line in enumerate(path.read_bytes().split(b"\n"), start=1):
        problem = None
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            line = raw_line.decode("utf-8", errors="replace")
            problem = (
                f"{path}, line {number}: byte 0x{raw_line[error.start]:02X} is not valid UTF-8"
            )
        if not line.strip():
            continue
        row = {"_row": number, "_raw": line[:RAW_TEXT_LIMIT], "_problem": problem}
        try:
            document = json.loads(line)
        except ValueError:
            document, row["_problem"] = None, problem or "the line is not valid JSON"
        if document is not None and not isinstance(document, dict):
            document, row["_problem"] = None, problem or "the line is not a JSON object"
        document = document or {}
        for key in FIELDS[:4]:
            value = document.get(names[key])
            row[key] = (
                value if isinstance(value, str) else None if value is None else json.dumps(value)
            )
        properties = document.get(names["properties"]) if names.get("properties") else None
        row["properties"] = (
            None if properties is None else json.dumps(properties, ensure_ascii=False)
        )
        # Only a `\u` escape can spell a lone surrogate: decoded UTF-8 never holds one.
        texts = [row[key] for key in (*FIELDS[:4], "properties")]
        surrogate = "\\u" in line and lone_surrogate_problem("\n".join(filter(None, texts)))
        if surrogate:
            for key in (*FIELDS[:4], "properties"):
                row[key] = replace_lone_surrogates(row[key])
            row["_problem"] = row["_problem"] or f"{path}, line {number}: {surrogate}"
        row["_properties_type"] = type(properties).__name__
        rows.append(row)
    schema = {
        "_row": pl.Int64,
        "_raw": pl.String,
        "_problem": pl.String,
        **{key: pl.String for key in FIELDS},
        "_properties_type": pl.String,
    }
    return pl.DataFrame(rows, schema=schema)


def _relation_sql(
    source: EventSource, connection: duckdb.DuckDBPyConnection, files: list[Path]
) -> str:
    """The source's rows with the mapped columns under our names, after checking they exist."""
    if source.format == "parquet":
        listed = ", ".join("'" + str(path).replace("'", "''") + "'" for path in files)
        relation = f"read_parquet([{listed}])"
    else:
        if not source.location.exists():
            raise EventSourceError(
                f"{source.location}: no such database (event source {source.name!r})"
            )
        # Read in the source's own connection (its query names its own tables), streamed in.
        query = source.query or "select * from " + ".".join(
            _quote(part) for part in source.table.split(".")
        )
        with duckdb.connect(str(source.location), read_only=True) as origin:
            try:
                table = origin.sql(query).fetch_arrow_table()
            except duckdb.Error as error:
                raise EventSourceError(
                    f"event source {source.name!r}: cannot read {source.description}: {error}"
                ) from None
        connection.register("event_source_rows", table)
        relation = "event_source_rows"
    described = connection.execute(f"describe select * from {relation}").fetchall()
    types = {row[0]: row[1] for row in described}
    wanted = [source.columns[key] for key in FIELDS if source.columns.get(key)]
    if source.loaded_at_column:
        wanted.append(source.loaded_at_column)
    for column in wanted:
        if column not in types:
            raise EventSourceError(
                f"event source {source.name!r}: no column {column!r} "
                f"(it has {', '.join(types) or 'no columns'})"
            )
    names = source.columns

    def text(key: str) -> str:
        return f"cast({_quote(names[key])} as varchar)"

    stamp = names["timestamp"]
    timestamp_is_typed = types[stamp].upper().startswith(("TIMESTAMP", "DATE"))
    properties = names.get("properties")
    if not properties:
        properties_sql, properties_type = "null", "'NoneType'"
    elif types[properties].upper() == "JSON" or types[properties].upper() == "VARCHAR":
        properties_sql = f"cast({_quote(properties)} as varchar)"
        properties_type = (
            f"case when {_quote(properties)} is null then 'NoneType' "
            f"when json_valid({_quote(properties)}) and json_type(cast({_quote(properties)} as json)) = 'OBJECT' then 'dict' "
            "else 'other' end"
        )
    else:
        properties_sql = f"cast(to_json({_quote(properties)}) as varchar)"
        properties_type = (
            f"case when {_quote(properties)} is null then 'NoneType' "
            f"when json_type(to_json({_quote(properties)})) = 'OBJECT' then 'dict' else 'other' end"
        )
    watermark = ""
    if source.loaded_at_column:
        last = connection.execute(
            "select max(loaded) from raw.event_loads where source_name = $name",
            {"name": source.name},
        ).fetchone()[0]
        if last is not None:
            watermark = f"where {_quote(source.loaded_at_column)} > {_literal(last)}::timestamptz"
    return f"""
        select
            row_number() over () as _row,
            -- a table's row is named by its number and message id (its text is not kept)
            cast(null as varchar) as _raw,
            cast(null as varchar) as _problem,
            {text("message_id")} as message_id,
            {text("user_id")} as user_id,
            {text("event")} as event,
            {"cast(null as varchar)" if timestamp_is_typed else text("timestamp")} as "timestamp",
            {properties_sql} as properties,
            {properties_type} as _properties_type,
            {f"cast({_quote(stamp)} as timestamptz)" if timestamp_is_typed else "cast(null as timestamptz)"} as _typed_at
            {f", cast({_quote(source.loaded_at_column)} as timestamptz) as _loaded_mark" if source.loaded_at_column else ""}
        from {relation} as source_rows
        {watermark}
    """


def _literal(value: object) -> str:
    return "'" + str(value).replace("'", "''") + "'"


# Why a row cannot be an event; the first that applies. A row that can goes to raw.events.
# A text timestamp is read only when it is ISO 8601 (the timestamp value rule); a typed one as is.
_EVENT_TIME = f"""
    coalesce(
        _typed_at,
        case when regexp_full_match("timestamp", '{TIMESTAMP_PATTERN}')
            then try_cast("timestamp" as timestamptz) end
    )
"""
_REASONS = """
    case
        when _problem is not null then _problem
        when user_id is null or user_id = '' then 'no user id (userId)'
        when event is null or event = '' then 'no event name (event)'
        when message_id is null or message_id = '' then 'no message id (messageId)'
        when _at is null and "timestamp" is null then 'no timestamp'
        when _at is null
            then 'timestamp ' || to_json("timestamp")::varchar || ' is not an ISO 8601 timestamp'
        when _properties_type not in ('NoneType', 'dict') then 'properties is not a JSON object'
    end
"""


def load_event_source(
    connection: duckdb.DuckDBPyConnection, source: EventSource, loaded_at: datetime
) -> EventLoadResult:
    """Append the source's new events to `raw.events` (one transaction); bad rows go to
    `raw.events_quarantine` with the reason, and a message id seen before is skipped."""
    ensure_event_schema(connection)
    skipped = 0
    if source.format == "duckdb":
        relations = [(_relation_sql(source, connection, []), None)]
    else:
        done = {
            row[0]
            for row in connection.execute(
                "select loaded from raw.event_loads where source_name = $name",
                {"name": source.name},
            ).fetchall()
        }
        files = [path for path in _files(source) if _fingerprint(path) not in done]
        skipped = len(_files(source)) - len(files)
        relations = []
        for path in files:
            if source.format == "jsonl":
                frame = _read_jsonl(source, path)
                connection.register(f"event_rows_{len(relations)}", frame.to_arrow())
                relations.append(
                    (
                        f"select *, cast(null as timestamptz) as _typed_at "
                        f"from event_rows_{len(relations)}",
                        path,
                    )
                )
            else:
                relations.append((_relation_sql(source, connection, [path]), path))
    totals = {"read": 0, "loaded": 0, "duplicates": 0, "quarantined": 0}
    connection.execute("begin transaction")
    try:
        for sql, path in relations:
            counts = _append(connection, source, sql, path, loaded_at)
            for key in totals:
                totals[key] += counts[key]
            if path is not None:
                connection.execute(
                    "insert into raw.event_loads values ($name, $loaded, $at)",
                    {"name": source.name, "loaded": _fingerprint(path), "at": loaded_at},
                )
        connection.execute("commit")
    except Exception:
        connection.execute("rollback")
        raise
    finally:
        for index in range(len(relations)):
            if source.format == "jsonl":
                connection.unregister(f"event_rows_{index}")
        if source.format == "duckdb":
            connection.unregister("event_source_rows")
    return EventLoadResult(
        source.name,
        totals["read"],
        totals["loaded"],
        totals["duplicates"],
        totals["quarantined"],
        skipped,
    )


def _append(connection, source: EventSource, rows_sql: str, path: Path | None, loaded_at) -> dict:
    location = str(path or source.location)
    connection.execute(
        f"create or replace temp table incoming_events as select *, {_REASONS} as _reason "
        f"from (select *, {_EVENT_TIME} as _at from ({rows_sql}))"
    )
    read = connection.execute("select count(*) from incoming_events").fetchone()[0]
    quarantined = connection.execute(
        """
        insert into raw.events_quarantine
        select $source, $location, _row, message_id, _reason, _raw, $at
        from incoming_events
        where _reason is not null
        order by _row
        """,
        {"source": source.name, "location": location, "at": loaded_at},
    ).fetchone()[0]
    number_event_users(connection, "select user_id from incoming_events where _reason is null")
    # A message id seen before (earlier in this batch, or in raw.events) is the same event.
    loaded = connection.execute(
        """
        insert into raw.events (
            event_seq, message_id, user_id, event, "timestamp", properties, source_name, loaded_at,
            user_number
        )
        select
            coalesce((select max(event_seq) from raw.events), 0)
                + row_number() over (order by _row) as event_seq,
            message_id,
            incoming.user_id,
            event,
            _at,
            coalesce(cast(properties as json), '{}'::json),
            $source,
            $at,
            numbers.user_number
        from incoming_events as incoming
        join raw.event_users as numbers on numbers.user_id = incoming.user_id
        where _reason is null
            and not exists (select 1 from raw.events as seen where seen.message_id = incoming.message_id)
        qualify row_number() over (partition by message_id order by _row) = 1
        """,
        {"source": source.name, "at": loaded_at},
    ).fetchone()[0]
    if source.loaded_at_column:
        mark = connection.execute("select max(_loaded_mark) from incoming_events").fetchone()[0]
        if mark is not None:
            connection.execute(
                "insert into raw.event_loads values ($name, $loaded, $at)",
                {"name": source.name, "loaded": mark.isoformat(), "at": loaded_at},
            )
    connection.execute("drop table incoming_events")
    return {
        "read": read,
        "loaded": loaded,
        "duplicates": read - quarantined - loaded,
        "quarantined": quarantined,
    }


def event_source_fingerprint(source: EventSource) -> str:
    """What changes when the source gains data: its files' sizes and times, or a table's newest
    ingestion time (row count without a `loaded_at_column`)."""
    if source.format == "duckdb":
        if not source.location.exists():
            return "missing"
        relation = (
            f"({source.query})"
            if source.query
            else ".".join(_quote(part) for part in source.table.split("."))
        )
        measure = (
            f"max({_quote(source.loaded_at_column)})" if source.loaded_at_column else "count(*)"
        )
        with duckdb.connect(str(source.location), read_only=True) as connection:
            return str(
                connection.execute(f"select {measure} from {relation} as source_rows").fetchone()[0]
            )
    if not source.location.exists():
        return "missing"
    return ";".join(_fingerprint(path) for path in _files(source))


def configured_event_sources(settings) -> list[EventSource]:
    """The event sources of the sources file (`events:`); none when there is no such file."""
    if settings.users_source or not Path(settings.sources_file).exists():
        return []
    return event_sources_from_file(settings.sources_file)
