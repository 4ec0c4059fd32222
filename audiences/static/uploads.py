"""CSV upload into a static audience: map columns, upsert the users, add them as members.

Knock's rules: users are upserted, rows with a missing or malformed id are skipped and reported,
and files over 10 MB are refused (the limit is a setting). Rejected rows go to a rejects file
beside the upload (row number, reason, raw values), with spreadsheet formulas neutralised so that
opening it is safe. Encodings, a BOM, `;` / tab / `|` delimiters, quoted fields with newlines,
duplicate rows and blank lines are handled by the same reader as user sources.

An empty cell in an upload means "not given" (it never removes a property), since upload files are
partial by nature.

What an upload records before it is answered: its checked rows and its members, as one batch of
the store's upload journal (`store.profiles.queue_upload`), in one transaction. What follows, each
exactly once and in the order uploads came: its members and their `entered` events
(`settle_uploads`), written right after the answer and before anything else reads or writes the
store (`MembershipStore` sees to it), so every read sees the upload from its answer on; then the
rows' identify patches, merged into the users' profiles and queued for the warehouse
(`apply_uploads`), before any later write of those profiles.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from audiences.identifiers import tenant_problem
from audiences.settings import FAULT_PAUSE_SECONDS, FAULT_POINT, UPLOAD_MAX_BYTES
from audiences.store.database import MembershipStore, now_text
from audiences.store.members import (
    ChangeResult,
    count_current_members,
    distinct_members,
    require_static,
)
from audiences.store.profiles import apply_uploads, lock_upload_members, queue_upload

# The same reading as user sources (encodings, BOM, delimiters).
from audiences.users.sources import ROW_COLUMN, SourceError, ragged_reason, read_csv_rows
from audiences.users.validation import check_users

DEFAULT_MAX_BYTES = UPLOAD_MAX_BYTES
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# A test's fault (`settings.FAULT_POINT`): the process kills itself (SIGKILL) right after an
# upload's answer, before it writes the members, events and patches that follow.
FAULT_AFTER_ANSWER = "upload-after-answer"


class UploadError(ValueError):
    """An upload refused as a whole (too large, unreadable, no id column, unknown audience)."""


@dataclass(frozen=True)
class UploadResult:
    rows: int
    blank_lines: int
    members_added: int
    members_unchanged: int
    users_identified: int
    rejected: int
    rejects_file: Path | None

    def as_metadata(self) -> dict:
        return {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in self.__dict__.items()
        }


def parse_mapping(pairs: list[str]) -> dict[str, str]:
    """`["Email Address=email", "Company=company.name"]` -> {column: field}."""
    mapping = {}
    for pair in pairs:
        column, separator, field = pair.partition("=")
        if not separator or not column or not field:
            raise UploadError(f"--map takes column=field, got {pair!r}")
        mapping[column] = field
    return mapping


@dataclass(frozen=True)
class PreparedUpload:
    """An upload read and checked, with nothing written yet: its members, the rows whose
    identify patches follow, and what to report."""

    audience_key: str
    path: Path
    members: pl.DataFrame  # `user_id`, `tenant`, `tenant_key`: each once (`distinct_members`)
    rows: pl.DataFrame  # `_row`, `id` and the other cells of the rows that passed
    rows_read: int
    blank_lines: int
    users_identified: int
    quarantined: pl.DataFrame  # `_row`, `user_id`, `reason`, `raw_row`


def prepare_upload(
    audience_key: str,
    path: Path,
    audience_types: dict[str, str],
    mapping: dict[str, str] | None = None,
    tenant_column: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> PreparedUpload:
    """Read and check one CSV file for a static audience (see the module docstring); writes
    nothing. Raises `UploadError` for a file refused as a whole."""
    path = Path(path)
    require_static(audience_key, audience_types)
    if not path.is_file():
        raise UploadError(f"{path}: no such file")
    size = path.stat().st_size
    if size > max_bytes:
        raise UploadError(
            f"{path}: {size:,} bytes is over the upload limit of {max_bytes:,} bytes "
            "(AUDIENCES_UPLOAD_MAX_BYTES); split the file"
        )
    mapping = dict(mapping or {})
    frame, ragged = _read(path, mapping)
    missing = [
        column
        for column in list(mapping) + ([tenant_column] if tenant_column else [])
        if column not in frame.columns
    ]
    if missing:
        raise UploadError(
            f"{path}: no column {', '.join(map(repr, missing))}; columns are {', '.join(frame.columns)}"
        )
    tenants = (
        frame.select(ROW_COLUMN, pl.col(tenant_column).alias("tenant"))
        if tenant_column
        else frame.select(ROW_COLUMN, pl.lit(None, dtype=pl.String).alias("tenant"))
    )
    if tenant_column:
        frame = frame.drop(tenant_column)
    frame = frame.rename({column: field for column, field in mapping.items()})
    if "id" not in frame.columns and "user_id" in frame.columns:
        frame = frame.rename({"user_id": "id"})
    if "id" not in frame.columns:
        raise UploadError(f"{path}: no id column; map one with --map <column>=id")
    blank = frame.select(pl.all_horizontal(pl.exclude(ROW_COLUMN).is_null())).to_series()
    blank_lines = int(blank.sum())
    frame = frame.filter(~blank)
    # The rows' checks now (a bad row is rejected with its number); their identify patches are
    # built after the upload is acknowledged, from the rows as they are (`queue_upload`).
    passed, quarantined = check_users(frame)
    passed, refused = _refuse_bad_tenants(passed.sort(ROW_COLUMN), tenants, tenant_column)
    quarantined = pl.concat([quarantined, refused])
    members = passed.select(ROW_COLUMN, "id").join(tenants, on=ROW_COLUMN, how="left")
    cells = [name for name in passed.columns if name not in (ROW_COLUMN, "id")]
    given = (
        passed.filter(pl.any_horizontal(pl.col(cells).is_not_null())) if cells else passed.clear()
    )
    return PreparedUpload(
        audience_key,
        path,
        distinct_members(members.rename({"id": "user_id"})),
        given,
        frame.height + blank_lines + ragged.height,
        blank_lines,
        given["id"].n_unique(),
        pl.concat([quarantined, ragged]).sort(ROW_COLUMN),
    )


def _refuse_bad_tenants(
    passed: pl.DataFrame, tenants: pl.DataFrame, tenant_column: str | None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The rows whose tenant cell is not a tenant (`identifiers.tenant_problem`: blank is no tenant,
    anything else an id, as the API checks a tenant) taken out of `passed`, as rejects naming the
    column; the rest of `passed`."""
    problems = {
        tenant: problem
        for tenant in tenants["tenant"].drop_nulls().unique().to_list()
        if (problem := tenant_problem(tenant))
    }
    if not problems:
        return passed, passed.clear().select(
            pl.col(ROW_COLUMN),
            pl.col("id").alias("user_id"),
            pl.lit(None, pl.String).alias("reason"),
            pl.lit(None, pl.String).alias("raw_row"),
        )
    bad = passed.join(tenants, on=ROW_COLUMN, how="left").filter(
        pl.col("tenant").is_in(list(problems))
    )
    refused = pl.DataFrame(
        {
            ROW_COLUMN: bad[ROW_COLUMN],
            "user_id": bad["id"],
            "reason": [f"{tenant_column}: {problems[t]}" for t in bad["tenant"]],
            "raw_row": [
                json.dumps(
                    {(tenant_column if k == "tenant" else k): v for k, v in row.items()},
                    ensure_ascii=False,
                    default=str,
                )
                for row in bad.drop(ROW_COLUMN).iter_rows(named=True)
            ],
        },
        schema={
            ROW_COLUMN: pl.Int64,
            "user_id": pl.String,
            "reason": pl.String,
            "raw_row": pl.String,
        },
    )
    return passed.filter(~pl.col(ROW_COLUMN).is_in(bad[ROW_COLUMN].implode())), refused


def record_upload(store: MembershipStore, connection, upload: PreparedUpload) -> ChangeResult:
    """Journal a prepared upload inside the caller's write transaction: its members and its rows
    as one batch, whose members and events are written right after the commit and before any
    other read or write (`settle_uploads`), then its identify patches (`apply_uploads`). Returns
    how many members it adds and how many were members already: the transaction began by writing
    every upload before it, and nothing writes members between its commit and its own."""
    if upload.members.is_empty():
        return ChangeResult(0, 0, [])
    lock_upload_members(store, connection)
    unchanged = count_current_members(store, connection, upload.audience_key, upload.members)
    queue_upload(store, connection, upload.audience_key, upload.rows, upload.members, now_text())
    return ChangeResult(upload.members.height - unchanged, unchanged, [])


def after_answer() -> None:
    """Called once an upload's answer is given, before what follows it is written: a test's fault
    (`FAULT_AFTER_ANSWER`) kills the process here."""
    if os.environ.get(FAULT_POINT) == FAULT_AFTER_ANSWER:
        time.sleep(FAULT_PAUSE_SECONDS)
        os.kill(os.getpid(), signal.SIGKILL)


def upload_csv(
    store: MembershipStore,
    audience_key: str,
    path: Path,
    audience_types: dict[str, str],
    mapping: dict[str, str] | None = None,
    tenant_column: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    rejects_file: Path | None = None,
    apply_patches: bool = True,
) -> UploadResult:
    """Upload one CSV file into a static audience; see the module docstring.

    The members and the rows (as one batch of the upload journal) are committed in one
    transaction: that is the upload done, and nothing of it is lost if the process dies after it;
    any read or write of the store from then on writes its members and events first. With
    `apply_patches`, those and then the batch's patches (users' profiles merged, patches queued
    for the warehouse) are written before returning; otherwise right after (the API after
    answering, the CLI after printing its answer), or by whoever reads the store or writes
    profiles next."""
    upload = prepare_upload(audience_key, path, audience_types, mapping, tenant_column, max_bytes)
    with store.engine.begin() as connection:
        result = record_upload(store, connection, upload)
    target = write_rejects(upload, rejects_file)
    if apply_patches:
        apply_uploads(store)
    return UploadResult(
        upload.rows_read,
        upload.blank_lines,
        result.changed,
        result.unchanged,
        upload.users_identified,
        upload.quarantined.height,
        target,
    )


def write_rejects(upload: PreparedUpload, rejects_file: Path | None = None) -> Path | None:
    """Write the upload's rejected rows to `rejects_file` (by default beside the upload, as
    `<name>.rejects.csv`); None when no row was rejected."""
    if not upload.quarantined.height:
        return None
    target = rejects_file or upload.path.with_name(upload.path.stem + ".rejects.csv")
    _write_rejects(target, upload.quarantined)
    return target


def _read(path: Path, mapping: dict[str, str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The file's rows (with their 1-based `_row`), and its ragged rows as rejects: a row with more
    or fewer fields than the header is reported with its line number, and the others are read."""
    try:
        frame, header, ragged = read_csv_rows(path)
    except SourceError as error:
        raise UploadError(str(error)) from None
    if ROW_COLUMN in frame.columns:
        frame = frame.drop(ROW_COLUMN)
    frame = frame.with_row_index(ROW_COLUMN, offset=1).with_columns(
        pl.col(ROW_COLUMN).cast(pl.Int64)
    )
    id_column = next(
        (column for column, field in mapping.items() if field == "id"),
        "id" if "id" in header else "user_id",
    )
    position = header.index(id_column) if id_column in header else None
    rejects = pl.DataFrame(
        [
            (
                row,
                fields[position] if position is not None and position < len(fields) else None,
                ragged_reason(line, fields, header),
                json.dumps(fields, ensure_ascii=False),
            )
            for row, (line, fields) in ragged.items()
        ],
        schema={
            ROW_COLUMN: pl.Int64,
            "user_id": pl.String,
            "reason": pl.String,
            "raw_row": pl.String,
        },
        orient="row",
    )
    return frame.filter(~pl.col(ROW_COLUMN).is_in(list(ragged))), rejects


def _neutralise(value: str | None) -> str:
    """A cell that a spreadsheet would run as a formula is prefixed with a quote."""
    if value is None:
        return ""
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


def _write_rejects(target: Path, quarantined: pl.DataFrame) -> None:
    with target.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "reason", "id", "raw"])
        for row, user_id, reason, raw in quarantined.select(
            ROW_COLUMN, "user_id", "reason", "raw_row"
        ).iter_rows():
            writer.writerow([row, reason, _neutralise(user_id), _neutralise(raw)])
