"""Where users come from: files (CSV, Parquet, JSON lines) and warehouse tables (DuckDB, SQLite).

A source is declared in `data/sources.yml` (or given as one URI) with a *mode*: `snapshot` (the
source holds every user; users it no longer holds are deleted) or `stream` (identify-style updates,
upserts only). Reading returns the raw rows as a polars frame with a 1-based `_row` column, so
every later error can name the row it came from. A row of a file with bytes that are not valid in
its encoding (UTF-8) is read with U+FFFD in their place and a reason naming the file, the line and
the encoding (`UNREADABLE_COLUMN`), which validation quarantines it with.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import duckdb
import polars as pl
import yaml

ROW_COLUMN = "_row"
# A UTF-16 surrogate on its own: JSON can spell one (`"\\ud800"`), but it is not Unicode text.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Set on rows of a file that hold bytes the file's encoding cannot read: why, naming file and line.
UNREADABLE_COLUMN = "_unreadable"
MODES = ("snapshot", "stream")
# What a source holds: users (`sources:`), Knock tenants (`tenants:`), or which users belong to
# which tenants (`tenant_memberships:`, a row per user and tenant with the membership's properties).
KINDS = {"users": "sources", "tenants": "tenants", "tenant_memberships": "tenant_memberships"}
# A membership row is named by these two columns; its `id` is both, as a JSON object.
MEMBERSHIP_ID_COLUMNS = ("user_id", "tenant_id")
FORMATS = ("csv", "parquet", "jsonl", "duckdb", "sqlite")
_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".duckdb": "duckdb",
    ".db": "sqlite",
    ".sqlite": "sqlite",
    ".sqlite3": "sqlite",
}


class SourceError(ValueError):
    """A source that cannot be read at all (missing file, no `id` column, bad declaration)."""


@dataclass(frozen=True)
class UserSource:
    """One declared source of users."""

    name: str
    format: str
    location: Path
    mode: str = "snapshot"
    table: str | None = None
    query: str | None = None
    id_column: str = "id"
    delimiter: str | None = None
    watermark_column: str | None = None
    kind: str = "users"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SourceError(f"source {self.name!r}: kind must be one of {', '.join(KINDS)}")
        if self.mode not in MODES:
            raise SourceError(
                f"source {self.name!r}: mode must be snapshot or stream, got {self.mode!r}"
            )
        if self.format not in FORMATS:
            raise SourceError(
                f"source {self.name!r}: format must be one of {', '.join(FORMATS)}, got {self.format!r}"
            )
        if self.format in ("duckdb", "sqlite") and not (self.table or self.query):
            raise SourceError(
                f"source {self.name!r}: a {self.format} source needs `table` or `query`"
            )

    @property
    def description(self) -> str:
        what = self.query or self.table
        return f"{self.format} {self.location}" + (f" ({what})" if what else "") + f", {self.mode}"


def sources_from_file(path: Path, kind: str = "users") -> list[UserSource]:
    """Read `sources.yml`: `sources: [{name, path, format?, mode?, table?, query?, id_column?}]`.

    With `kind="tenants"` or `"tenant_memberships"`, the list of that name (optional: none when
    the file has no such list); source names are unique across the three lists."""
    path = Path(path)
    section = KINDS[kind]
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise SourceError(f"{path}: cannot read the sources file ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise SourceError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    entries = document.get(section) if isinstance(document, dict) else None
    if kind != "users" and isinstance(document, dict) and entries is None:
        return []
    if not isinstance(entries, list):
        raise SourceError(f"{path}: expected `{section}:` with a list of sources")
    sources = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("path"):
            raise SourceError(f"{path}: {section}[{index}] needs at least `name` and `path`")
        location = Path(entry["path"])
        location = location if location.is_absolute() else (path.parent / location).resolve()
        sources.append(
            UserSource(
                name=str(entry["name"]),
                format=entry.get("format") or guess_format(location),
                location=location,
                mode=entry.get("mode", "snapshot"),
                table=entry.get("table"),
                query=entry.get("query"),
                id_column=entry.get("id_column", "id"),
                delimiter=entry.get("delimiter"),
                watermark_column=entry.get("watermark_column"),
                kind=kind,
            )
        )
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise SourceError(f"{path}: source names must be unique, got {names}")
    if kind != "users":
        others = {
            name for other in KINDS if other != kind for name in _names(document.get(KINDS[other]))
        }
        clashing = sorted(others.intersection(names))
        if clashing:
            raise SourceError(
                f"{path}: source names must be unique across {', '.join(KINDS.values())}; "
                f"{', '.join(map(repr, clashing))} is used twice"
            )
    return sources


def _names(entries: object) -> list[str]:
    if not isinstance(entries, list):
        return []
    return [
        str(entry["name"]) for entry in entries if isinstance(entry, dict) and entry.get("name")
    ]


def source_from_uri(uri: str, mode: str = "snapshot", name: str = "users") -> UserSource:
    """One source from a path or URI: `users.csv`, `folder/` of Parquet,
    `sqlite:///path.db?table=users`, `duckdb:///path.duckdb?query=select ...`."""
    parsed = urlparse(uri)
    if parsed.scheme in ("sqlite", "duckdb"):
        params = parse_qs(parsed.query)
        location = Path(parsed.netloc + parsed.path) if parsed.netloc else Path(parsed.path)
        return UserSource(
            name,
            parsed.scheme,
            location.resolve(),
            mode,
            table=params.get("table", [None])[0],
            query=params.get("query", [None])[0],
            id_column=params.get("id_column", ["id"])[0],
        )
    location = Path(uri).expanduser().resolve()
    return UserSource(name, guess_format(location), location, mode)


def guess_format(location: Path) -> str:
    if location.is_dir():
        return "parquet"
    fmt = _EXTENSIONS.get(location.suffix.lower())
    if fmt is None:
        raise SourceError(f"{location}: cannot tell the format from the extension; set `format:`")
    return fmt


def read_source(source: UserSource) -> pl.DataFrame:
    """The source's raw rows, with a 1-based `_row` column and the id column renamed to `id`."""
    if source.format not in ("duckdb", "sqlite") and not source.location.exists():
        raise SourceError(f"{source.location}: no such file or folder (source {source.name!r})")
    reader = {
        "csv": _read_csv,
        "parquet": _read_parquet,
        "jsonl": _read_jsonl,
        "duckdb": _read_duckdb,
        "sqlite": _read_sqlite,
    }[source.format]
    frame = reader(source)
    if source.kind == "tenant_memberships":
        return _membership_rows(source, frame)
    if source.id_column != "id":
        if "id" in frame.columns:
            frame = frame.drop("id")
        frame = (
            frame.rename({source.id_column: "id"}) if source.id_column in frame.columns else frame
        )
    if "id" not in frame.columns:
        raise SourceError(
            f"{source.location}: no `{source.id_column}` column (source {source.name!r}); "
            f"columns are {', '.join(frame.columns)}"
        )
    if ROW_COLUMN in frame.columns:
        frame = frame.drop(ROW_COLUMN)
    return frame.with_row_index(ROW_COLUMN, offset=1).with_columns(
        pl.col(ROW_COLUMN).cast(pl.Int64)
    )


def _membership_rows(source: UserSource, frame: pl.DataFrame) -> pl.DataFrame:
    """A membership source's rows: `user_id` and `tenant_id` as text, and `id` naming both (a JSON
    object; null when either is missing, which validation reports by column)."""
    missing = [name for name in MEMBERSHIP_ID_COLUMNS if name not in frame.columns]
    if missing:
        raise SourceError(
            f"{source.location}: no {' or '.join(f'`{name}`' for name in missing)} column "
            f"(tenant membership source {source.name!r}); columns are {', '.join(frame.columns)}"
        )
    frame = frame.drop([name for name in ("id", ROW_COLUMN) if name in frame.columns])
    frame = frame.with_columns(pl.col(name).cast(pl.String) for name in MEMBERSHIP_ID_COLUMNS)
    both = pl.all_horizontal(pl.col(name).is_not_null() for name in MEMBERSHIP_ID_COLUMNS)
    frame = frame.with_columns(
        pl.when(both)
        .then(pl.struct(*MEMBERSHIP_ID_COLUMNS).struct.json_encode())
        .otherwise(pl.lit(None, dtype=pl.String))
        .alias("id")
    )
    return frame.with_row_index(ROW_COLUMN, offset=1).with_columns(
        pl.col(ROW_COLUMN).cast(pl.Int64)
    )


def source_fingerprint(source: UserSource) -> str:
    """What changes when the source's data changes: file sizes and times, or a table's watermark.

    Database sources without a `watermark_column` report their row count, which misses updates in
    place; declare `watermark_column` (e.g. an `updated_at` column) to catch those.
    """
    if source.format in ("duckdb", "sqlite"):
        if not source.location.exists():
            return "missing"
        relation = f"({source.query}) as source" if source.query else _quote_qualified(source.table)
        measure = (
            f"max({_quote_qualified(source.watermark_column)})"
            if source.watermark_column
            else "count(*)"
        )
        sql = f"select {measure} from {relation}"
        if source.format == "duckdb":
            with duckdb.connect(str(source.location), read_only=True) as connection:
                return str(connection.execute(sql).fetchall()[0][0])
        with sqlite3.connect(f"file:{source.location}?mode=ro", uri=True) as connection:
            return str(connection.execute(sql).fetchall()[0][0])
    if not source.location.exists():
        return "missing"
    files = (
        sorted(source.location.rglob("*.parquet"))
        if source.location.is_dir()
        else [source.location]
    )
    return ";".join(
        f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path in files
    )


def _read_csv(source: UserSource) -> pl.DataFrame:
    """The rows of a CSV source: every value a string (Knock's rule), empty cells nulls (unset
    properties). A row with more or fewer fields than the header is not read as it is (the
    missing cells would remove properties, the extra ones were a failed load): it is marked
    unreadable (`UNREADABLE_COLUMN`), naming its line, and quarantined with its id."""
    frame, header, ragged = read_csv_rows(source.location, source.delimiter)
    if not ragged:
        return frame
    reasons = [None] * frame.height
    for row, (line, fields) in ragged.items():
        reasons[row - 1] = ragged_reason(line, fields, header)
    if UNREADABLE_COLUMN in frame.columns:  # bytes that are not text: their reason comes first
        reasons = [
            unreadable or ragged_row
            for unreadable, ragged_row in zip(frame[UNREADABLE_COLUMN], reasons, strict=True)
        ]
        frame = frame.drop(UNREADABLE_COLUMN)
    return frame.with_columns(pl.Series(UNREADABLE_COLUMN, reasons, dtype=pl.String))


def read_csv_rows(
    location: Path, delimiter: str | None = None
) -> tuple[pl.DataFrame, list[str], dict[int, tuple[int, list[str]]]]:
    """A CSV file's rows (every value a string, empty cells null; rows of a file with bytes that
    are not valid text marked in `UNREADABLE_COLUMN`), its header when it was read record by
    record, and its ragged rows: those with more or fewer fields than the header, by row number
    (1-based) as (line, fields). A ragged row is in the frame with its fields cut or padded to
    the header's, so its id is known; the caller decides what it is worth."""
    raw = location.read_bytes()
    text, encoding, lossy = _read_text(raw)
    delimiter = delimiter or _sniff_delimiter(text)
    try:
        frame, failure = (
            pl.read_csv(
                text.encode("utf-8"),
                separator=delimiter,
                infer_schema=False,
                truncate_ragged_lines=False,
                raise_if_empty=False,
            ),
            None,
        )
    except Exception as error:  # polars' errors have no common class
        frame, failure = None, error
    header, ragged = [], {}
    # The fast reader fails on a row with too many fields, and fills a row with too few with
    # nulls: only then (an error, or nulls in the last column) is the file read record by record
    # to find such rows (0.8 s for 10 MB, three times the fast reader).
    if frame is None or (frame.width and frame[frame.columns[-1]].null_count()):
        try:
            header, records, ragged = _records(text, delimiter)
            if ragged:
                frame = _frame_of_records(header, records, ragged)
        except csv.Error as error:
            failure = failure or error
    if frame is None:
        raise SourceError(f"{location}: cannot read as CSV: {failure}")
    if lossy:
        frame = frame.with_columns(
            pl.Series(
                UNREADABLE_COLUMN,
                _unreadable_csv_rows(raw, text, delimiter, frame, location, encoding),
                dtype=pl.String,
            )
        )
    return frame, header, ragged


def ragged_reason(line: int, fields: list[str], header: list[str]) -> str:
    """Why a ragged CSV row is not read (a source's quarantine, an upload's rejects)."""
    return f"line {line}: {len(fields)} fields where the header has {len(header)}"


def _records(
    text: str, delimiter: str
) -> tuple[list[str], list[list[str]], dict[int, tuple[int, list[str]]]]:
    """The header, every record, and the records whose number of fields differs from the
    header's, by row number (1-based, blank lines counted as rows, as the CSV reader counts
    them): (line, fields)."""
    csv.field_size_limit(
        max(csv.field_size_limit(), len(text))
    )  # a cell may be as large as the file
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return [], [], {}
    width, records, ragged, line = len(header), [], {}, reader.line_num + 1
    for row, fields in enumerate(reader, start=1):
        if fields and len(fields) != width:
            ragged[row] = (line, fields)
        records.append(fields)
        line = reader.line_num + 1
    return header, records, ragged


def _frame_of_records(header: list[str], records: list[list[str]], ragged: dict) -> pl.DataFrame:
    """The file's records as a frame (when it has ragged rows, which the fast reader cannot
    report): a ragged row's fields are cut or padded with nulls to the header's number."""
    width = len(header)
    rows = []
    for row, fields in enumerate(records, start=1):
        if row in ragged:
            fields = (fields + [""] * width)[:width]
        rows.append([value or None for value in fields] if fields else [None] * width)
    return pl.DataFrame(
        rows, schema={name: pl.String for name in _unique_names(header)}, orient="row"
    )


def _unique_names(header: list[str]) -> list[str]:
    """Column names as the fast reader makes them unique (`name`, `name_duplicated_0`, ...)."""
    seen: dict[str, int] = {}
    names = []
    for name in header:
        if name in seen:
            names.append(f"{name}_duplicated_{seen[name]}")
            seen[name] += 1
        else:
            seen[name] = 0
            names.append(name)
    return names


REPLACEMENT = "\ufffd"
# Bytes that Windows-1252 leaves undefined.
_UNDEFINED_IN_CP1252 = frozenset(b"\x81\x8d\x8f\x90\x9d")


def _read_text(raw: bytes) -> tuple[str, str, bool]:
    """The text, the encoding it was read in, and whether some bytes could not be read: UTF-8
    (with or without BOM), else UTF-16 with BOM, else Windows-1252 for a file with no UTF-8 in it at
    all (a legacy export). Unreadable bytes become U+FFFD; `_unreadable_csv_rows` names their lines."""
    for bom, encoding, codec in (
        (b"\xef\xbb\xbf", "UTF-8", "utf-8"),
        (b"\xff\xfe", "UTF-16", "utf-16"),
        (b"\xfe\xff", "UTF-16", "utf-16"),
    ):
        if raw.startswith(bom):
            body = raw[len(bom) :] if codec == "utf-8" else raw
            try:
                return body.decode(codec), encoding, False
            except UnicodeDecodeError:
                return body.decode(codec, errors="replace"), encoding, True
    try:
        return raw.decode("utf-8"), "UTF-8", False
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8", errors="replace")
    if any(character > "\x7f" and character != REPLACEMENT for character in text):
        return (
            text,
            "UTF-8",
            True,
        )  # UTF-8 with some bad bytes: read as Windows-1252, the rest would garble
    if not _UNDEFINED_IN_CP1252.intersection(raw):
        return raw.decode("cp1252"), "Windows-1252", False
    return raw.decode("cp1252", errors="replace"), "Windows-1252", True


def _bad_byte(line: bytes, encoding: str) -> tuple[int, int] | None:
    """The first byte of `line` that `encoding` cannot read, and its 1-based column in bytes."""
    if encoding == "Windows-1252":
        found = next(
            (index for index, byte in enumerate(line) if byte in _UNDEFINED_IN_CP1252), None
        )
        return None if found is None else (line[found], found + 1)
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as error:
        return line[error.start], error.start + 1
    return None


def _unreadable_message(location: Path, line_number: int, line: bytes | None, encoding: str) -> str:
    """Why a line cannot be read: the file, the line, the byte, and the encoding expected (UTF-8)."""
    found = _bad_byte(line, encoding) if line is not None else None
    what = f"byte 0x{found[0]:02X} (column {found[1]})" if found else "a byte"
    valid = {"UTF-8": "UTF-8", "Windows-1252": "UTF-8, nor Windows-1252"}.get(encoding, encoding)
    return f"{location}, line {line_number}: {what} is not valid {valid}; the file must be encoded in UTF-8"


def _unreadable_csv_rows(
    raw: bytes, text: str, delimiter: str, frame: pl.DataFrame, location: Path, encoding: str
) -> list[str | None]:
    """Per data row, why it cannot be read (the first line of it holding an unreadable byte), or None.
    Records are counted again with Python's csv module, which tells the lines each one spans."""
    lines = text.split("\n")
    raw_lines = raw.split(b"\n") if encoding != "UTF-16" else [None] * len(lines)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw_lines[0] = raw_lines[0][3:]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    spans = []
    start = 1
    for _ in reader:  # a blank line is a row of nulls, as polars reads it
        end = reader.line_num
        spans.append((start, end))
        start = end + 1
    spans = spans[1:]  # the header
    if len(spans) != frame.height:  # the two parsers disagree: name the row instead of its line
        unreadable = frame.select(
            pl.any_horizontal(
                pl.col(pl.String).str.contains(REPLACEMENT, literal=True).fill_null(False)
            )
        ).to_series()
        return [
            f"{location}, row {index + 1}: bytes that are not valid {encoding}; the file must be encoded "
            "in UTF-8"
            if bad
            else None
            for index, bad in enumerate(unreadable)
        ]
    reasons: list[str | None] = []
    for first, last in spans:
        bad = next(
            (
                number
                for number in range(first, last + 1)
                if number <= len(lines)
                and REPLACEMENT in lines[number - 1]
                and (raw_lines[number - 1] is None or _bad_byte(raw_lines[number - 1], encoding))
            ),
            None,
        )
        reasons.append(
            None
            if bad is None
            else _unreadable_message(
                location, bad, raw_lines[bad - 1] if bad <= len(raw_lines) else None, encoding
            )
        )
    return reasons


def _sniff_delimiter(text: str) -> str:
    header = text.split("\n", 1)[0]
    counts = {delimiter: header.count(delimiter) for delimiter in (",", ";", "\t", "|")}
    return max(counts, key=counts.get) if max(counts.values()) else ","


def _read_parquet(source: UserSource) -> pl.DataFrame:
    target = source.location / "**/*.parquet" if source.location.is_dir() else source.location
    return pl.read_parquet(target)


def _read_jsonl(source: UserSource) -> pl.DataFrame:
    """Each line is a Knock user (or tenant) object; it is kept whole in `properties` so nothing is
    lost. A membership line's `user_id` and `tenant_id` are its id columns, the rest its properties.
    A line that is not valid UTF-8 is read with U+FFFD in place of its bad bytes (so its id is
    still known) and marked unreadable, naming the file and the line."""
    keys = MEMBERSHIP_ID_COLUMNS if source.kind == "tenant_memberships" else ("id",)
    ids: dict[str, list] = {key: [] for key in keys}
    documents, unreadable = [], []
    raw = source.location.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for number, raw_line in enumerate(raw.split(b"\n"), start=1):
        try:
            line, problem = raw_line.decode("utf-8"), None
        except UnicodeDecodeError:
            line = raw_line.decode("utf-8", errors="replace")
            problem = _unreadable_message(source.location, number, raw_line, "UTF-8")
        if not line.strip():
            continue
        unreadable.append(problem)
        try:
            document = json.loads(line)
        except ValueError:
            for key in keys:
                ids[key].append(None)
            documents.append(line)
            continue
        line_ids = []
        for key in keys:
            identifier = document.pop(key, None) if isinstance(document, dict) else None
            if isinstance(identifier, str) or identifier is None:
                line_ids.append(identifier)
                continue
            line_ids.append(json.dumps(identifier, ensure_ascii=False))
            # A whole number is an id as its digits (as a CSV or Parquet id is); `true`, `1.5`,
            # a list or an object is no id at all, however it would print.
            if type(identifier) is not int:
                unreadable[-1] = unreadable[-1] or (
                    f"{source.location}, line {number}: {key} is "
                    f"{_json_kind(identifier)}, not text or a whole number"
                )
        text = json.dumps(document, ensure_ascii=False)
        # Python reads NaN, Infinity and 1e400, which JSON has not: such a line is quarantined,
        # saying so (looked for only where Python wrote one back, at no cost to other lines).
        if "NaN" in text or "Infinity" in text:
            not_json = _not_json_number(line)
            if not_json:
                unreadable[-1] = unreadable[-1] or f"{source.location}, line {number}: {not_json}"
                text = json.dumps(_finite_only(document), ensure_ascii=False)  # kept as JSON
        # Only a `\u` escape can spell a lone surrogate: decoded UTF-8 never holds one.
        surrogate = "\\u" in line and lone_surrogate_problem(
            "\n".join(filter(None, [text, *line_ids]))
        )
        if surrogate:
            text = replace_lone_surrogates(text)
            line_ids = [replace_lone_surrogates(value) for value in line_ids]
            unreadable[-1] = unreadable[-1] or f"{source.location}, line {number}: {surrogate}"
        for key, identifier in zip(keys, line_ids, strict=True):
            ids[key].append(identifier)
        documents.append(text)
    frame = pl.DataFrame(
        {**ids, "properties": documents},
        schema={**dict.fromkeys(keys, pl.String), "properties": pl.String},
    )
    if any(problem is not None for problem in unreadable):
        frame = frame.with_columns(pl.Series(UNREADABLE_COLUMN, unreadable, dtype=pl.String))
    return frame


class _NotJson(ValueError):
    """A number Python's JSON reader takes that JSON does not have."""


def _not_json(constant: str):
    raise _NotJson(f"{constant} is not a JSON number")


def _finite_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"{text} is beyond what a JSON number can hold")
    return value


def _finite_only(value: object) -> object:
    """`value` with each NaN or infinite number in it as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_only(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_only(item) for item in value]
    return value


def _not_json_number(line: str) -> str | None:
    """Why a line Python's reader took is not JSON (NaN, Infinity, 1e400), or None."""
    try:
        json.loads(line, parse_constant=_not_json, parse_float=_finite_number)
    except _NotJson as error:
        return str(error)
    return None


def _json_kind(value: object) -> str:
    """What a decoded JSON value is, for a message: `a boolean (true)`, `a list`, ..."""
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, float):
        return f"a fractional number ({json.dumps(value)})"
    return "a list" if isinstance(value, list) else "an object"


def lone_surrogate_problem(text: str) -> str | None:
    """Why JSON-decoded `text` is not Unicode text (it holds a lone surrogate, which JSON can
    spell as `\\ud800` but UTF-8 cannot hold), or None. A line with one is quarantined, never the
    reason a load fails."""
    found = _LONE_SURROGATE.search(text)
    if found is None:
        return None
    return f"`\\u{ord(found.group()):04x}` is a lone surrogate, not Unicode text"


def replace_lone_surrogates(text: str | None) -> str | None:
    """`text` with each lone surrogate replaced by U+FFFD, so that the row can be kept (quarantined)."""
    return None if text is None else _LONE_SURROGATE.sub(REPLACEMENT, text)


def _read_duckdb(source: UserSource) -> pl.DataFrame:
    query = source.query or f"select * from {_quote_qualified(source.table)}"
    with duckdb.connect(str(source.location), read_only=True) as connection:
        return connection.sql(query).pl()


def _read_sqlite(source: UserSource) -> pl.DataFrame:
    if not source.location.exists():
        raise SourceError(f"{source.location}: no such SQLite database (source {source.name!r})")
    query = source.query or f"select * from {_quote_qualified(source.table)}"
    with sqlite3.connect(f"file:{source.location}?mode=ro", uri=True) as connection:
        cursor = connection.execute(query)
        names = [column[0] for column in cursor.description]
        rows = cursor.fetchall()
    # SQLite columns are loosely typed: a column whose values mix types is read as text.
    columns = {}
    for index, name in enumerate(names):
        values = [row[index] for row in rows]
        kinds = {type(value) for value in values if value is not None}
        if len(kinds) > 1 and not kinds <= {int, float}:
            values = [None if value is None else str(value) for value in values]
        columns[name] = values
    return pl.DataFrame(columns, strict=False)


def _quote_qualified(name: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))
