"""The audience models for Apache Spark (dbt-spark), generated from the same definitions.

`audiences generate --target spark` writes them into the Spark dbt project (`dbt_spark/`, beside
the DuckDB one): the attribute layer in two tables (each user's JSON parsed once into VARIANTs,
then the typed columns), one view per audience with its conditions compiled by the same compiler
in Spark's dialect, `audience_members` (their union) and `audience_catalog` (the audiences this
evaluation covers). The project's hand-written models then diff the members against the committed
membership history in Spark SQL and publish the events atomically (`macros/membership.sql`).
Builds are incremental: `int_build_plan` (full or incremental, from the last completion marker,
with `models_hash`, the hash of the other generated models) and `int_users_to_reevaluate` (the
changed users and the compiler's time windows) choose the users evaluated; the two tables kept
between builds are a base plus one delta per build, read only once the build commits
(`macros/incremental.sql`).

What does not run on Spark yet is named, per audience, by `spark_unsupported`: static audiences
(their members live in the store), audiences with event conditions, and those reading either.
Hand-written SQL audiences (`models/generated/custom/`) are DuckDB SQL and stay there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlglot import exp

from audiences.conditions.compiler import (
    SPARK,
    VARIANTS,
    Attribute,
    CompileContext,
    compile_condition,
    reads_events,
    render,
    time_windows,
)
from audiences.conditions.definitions import AudienceDefinition, Problem, evaluation_order
from audiences.dbt.models import (
    GENERATED_HEADER,
    GeneratedFile,
    _comment,
    _indent,
    _placeholder,
    _Placeholders,
    _with_jinja,
    condition_json,
    drift,
    escape_jinja,
    flattened_columns,
    write_models,
)

# The Spark dbt project: a folder beside the DuckDB project (`dbt_project`).
SPARK_PROJECT_FOLDER = "dbt_spark"
# The run's settings, as dbt's environment (read by macros/evaluation_time.sql).
EVALUATION_TIME_VARIABLE = "AUDIENCES_SPARK_EVALUATION_TIME"
USERS_PARQUET_VARIABLE = "AUDIENCES_SPARK_USERS_PARQUET"
EXTRACTED_MODEL = "int_users_extracted"
FLATTENED_MODEL = "int_users_flattened"
USERS_MODEL = "stg_users"
PLAN_MODEL = "int_build_plan"
REEVALUATE_MODEL = "int_users_to_reevaluate"
# What every audience reads: the users this build evaluates (hand-written, models/intermediate/).
EVALUATED_USERS_MODEL = "int_users_to_evaluate"
# Generated into the Spark project (the rest of it is hand-written).
SPARK_GENERATED_FOLDERS = (Path("models/generated"),)
# The line a build's last statement logs (dbt_spark/macros/incremental.sql), with its run id.
COMMITTED = re.compile(r"build committed: run ([0-9A-Za-z-]+)")
# Where a build's events are written before their partition is attached (macros/membership.sql).
EVENTS_FOLDER = "membership_events_published"
# How long a cluster target may take to accept a connection before it counts as unreachable.
CONNECT_TIMEOUT_SECONDS = 10


def spark_project_dir(dbt_project_dir: Path) -> Path:
    """The Spark dbt project that goes with this DuckDB dbt project."""
    return Path(dbt_project_dir).parent / SPARK_PROJECT_FOLDER


def spark_unsupported(definitions: dict[str, AudienceDefinition]) -> dict[str, str]:
    """Dynamic audiences that cannot be evaluated on Spark yet, each with the reason (for
    `validate --target spark` and the generator, which leaves them out). Static audiences are not
    evaluated anywhere (their events are written when they change), but Spark has no copy of their
    members, so an audience reading one cannot run there."""
    reasons: dict[str, str] = {}
    static = {key for key, d in definitions.items() if d.type == "static"}
    for key in evaluation_order(definitions):
        definition = definitions[key]
        if definition.type == "static":
            continue
        if definition.per_tenant:
            reasons[key] = (
                "a per-tenant audience (tenancy: per_tenant) is evaluated on DuckDB only for now"
            )
        elif reads_events(definition.segments):
            reasons[key] = (
                "event conditions (performed, last_performed_*) run on DuckDB only for now"
            )
        else:
            unknown = sorted(k for k in definition.references() if k not in definitions)
            blocked = sorted(k for k in definition.references() if k in reasons)
            if unknown:
                reasons[key] = (
                    f"reads the hand-written SQL audience `{unknown[0]}`, which is DuckDB SQL"
                )
            elif blocked:
                reasons[key] = f"reads the audience `{blocked[0]}`, which does not run on Spark"
            elif definition.references() & static:
                reasons[key] = (
                    f"reads the static audience `{sorted(definition.references() & static)[0]}`, "
                    "whose members only the DuckDB warehouse copies in from the store"
                )
    return reasons


def spark_problems(definitions: dict[str, AudienceDefinition]) -> list[Problem]:
    """`spark_unsupported` as definition problems, each naming the file and the condition."""
    problems = []
    for key, reason in sorted(spark_unsupported(definitions).items()):
        definition = definitions[key]
        where = "$.tenancy" if definition.per_tenant else "$"
        for segment in definition.segments if not definition.per_tenant else ():
            for condition in segment:
                if reads_events([[condition]]) or (
                    condition.operator.endswith("is_audience_member")
                    or condition.operator.endswith("is_not_audience_member")
                ):
                    where = condition.location or where
                    break
            if where != "$":
                break
        problems.append(
            Problem(str(definition.file), where, f"cannot run on the Spark target: {reason}")
        )
    return problems


def generate_spark(settings, check: bool = False) -> int:
    """`audiences generate --target spark`: write (or with `check`, compare) the Spark project's
    generated models; the audiences left out are listed on stderr. Returns the exit code."""
    import sys

    from audiences.dbt.project import project_definitions

    project = spark_project_dir(settings.dbt_project_dir)
    if not (project / "dbt_project.yml").is_file():
        print(f"error: {project}: no Spark dbt project (dbt_project.yml) there", file=sys.stderr)
        return 1
    found = project_definitions(settings)
    files = generate_spark_models(found.definitions, settings.definitions_dir.name)
    if check:
        problems = spark_drift(files, project)
        for problem in problems:
            print(problem)
        if problems:
            print(
                "error: generated Spark models are out of date; run `audiences generate --target spark`",
                file=sys.stderr,
            )
            return 1
        print(f"{len(files)} generated Spark files are up to date")
        return 0
    changed = write_spark_models(files, project)
    print(f"{len(changed)} files changed" + "".join(f"\n  {path}" for path in changed))
    for key, reason in sorted(spark_unsupported(found.definitions).items()):
        print(f"not on Spark: {key}: {reason}", file=sys.stderr)
    return 0


@dataclass(frozen=True)
class _SparkAudience:
    where: str
    attributes: frozenset[Attribute]


def _compile(definition: AudienceDefinition, placeholders: _Placeholders) -> _SparkAudience:
    """The audience's WHERE clause in Spark SQL over int_users_flattened's columns (other
    audiences read from their views), and the attributes it reads."""
    refs: dict[str, str] = {}
    attributes: set[Attribute] = set()

    def members_of(key: str) -> exp.Expression:
        # Dynamic audiences have no tenant (the only ones a Spark audience can read).
        return (
            exp.select("user_key")
            .from_(exp.to_table(refs.setdefault(key, f"{placeholders.ref_prefix}_{len(refs)}")))
            .where(exp.Is(this=exp.column("tenant"), expression=exp.Null()))
        )

    def attribute_column(attribute: Attribute) -> exp.Expression:
        attributes.add(attribute)
        return exp.column(attribute.column_name, quoted=True)

    context = CompileContext(
        attribute=attribute_column,
        audience_members=members_of,
        evaluation_time=exp.column(placeholders.now),
        user_key=exp.column("user_key"),
        user_id=exp.column("user_id"),
    )
    segments_sql = []
    for index, segment in enumerate(definition.segments, start=1):
        parts = []
        for condition in segment:
            described = _comment(json.dumps(condition_json(condition), ensure_ascii=False))
            compiled = render(compile_condition(condition, context), dialect=SPARK)
            parts.append(f"-- {described}\n{compiled}")
        inner = "\n\nand\n\n".join(parts) if parts else "false"
        segments_sql.append(f"-- segment {index}\n(\n{_indent(inner, 4, SPARK)}\n)")
    where = (
        "\n\nor\n\n".join(segments_sql) if segments_sql else "false -- no segments: nobody matches"
    )
    from audiences.conditions.definitions import model_name_for

    replacements = {name: f"{{{{ ref('{model_name_for(key)}') }}}}" for key, name in refs.items()}
    replacements[placeholders.now] = "{{ evaluation_time() }}"
    # Spark quotes every identifier with backticks: the quoted placeholder goes first.
    ordered = sorted(replacements.items(), key=lambda item: -len(item[0]))
    quoted = {f"`{name}`": jinja for name, jinja in ordered}
    return _SparkAudience(_with_jinja(where, {**quoted, **dict(ordered)}), frozenset(attributes))


def generate_spark_models(
    definitions: dict[str, AudienceDefinition], source_label: str
) -> list[GeneratedFile]:
    """Every generated file of the Spark dbt project, deterministically, for these definitions.
    Audiences `spark_unsupported` names are left out (`validate --target spark` says why)."""
    unsupported = spark_unsupported(definitions)
    audiences = [
        definitions[key]
        for key in sorted(definitions)
        if key not in unsupported and definitions[key].type == "dynamic"
    ]
    placeholders = _Placeholders.for_definitions(definitions.values())
    compiled = {d.key: _compile(d, placeholders) for d in audiences}
    attributes = sorted(
        set().union(*(c.attributes for c in compiled.values())),
        key=lambda a: (a.path, VARIANTS.index(a.variant)),
    )
    header = escape_jinja(GENERATED_HEADER.format(source=_comment(source_label)))
    files = [
        GeneratedFile(
            Path(f"models/generated/{EXTRACTED_MODEL}.sql"), _extracted(attributes, header)
        ),
        GeneratedFile(
            Path(f"models/generated/{FLATTENED_MODEL}.sql"), _flattened(attributes, header)
        ),
    ]
    for definition in audiences:
        files.append(
            GeneratedFile(
                Path(f"models/generated/{definition.model_name}.sql"),
                _audience_model(definition, compiled[definition.key]),
            )
        )
    files.append(
        GeneratedFile(
            Path("models/generated/audience_catalog.sql"), _catalog(audiences, unsupported, header)
        )
    )
    files.append(
        GeneratedFile(Path("models/generated/audience_members.sql"), _members(audiences, header))
    )
    files.append(
        GeneratedFile(
            Path(f"models/generated/{REEVALUATE_MODEL}.sql"),
            _reevaluate(audiences, placeholders, header),
        )
    )
    # The hash of every other generated model: a build after any of them changed is full.
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda f: str(f.path)):
        digest.update(f"{file.path}\0{file.text}\0".encode())
    files.append(
        GeneratedFile(
            Path(f"models/generated/{PLAN_MODEL}.sql"), _plan(digest.hexdigest()[:16], header)
        )
    )
    return files


def _extracted(attributes: list[Attribute], header: str) -> str:
    extraction, _ = flattened_columns(attributes, SPARK)
    return f"""{header}
-- Every property an audience reads, parsed out of each user's JSON once (Spark 4 VARIANTs). A
-- table of its own: one projection would let Spark's optimizer inline the parse into every column.

-- An incremental build parses only the users loaded, changed or deleted since the last committed
-- build (macros/incremental.sql).

{{{{ config(materialized='table') }}}}

{{%- set plan = build_plan() %}}

select
    user_key,
    user_id,
    {_indent(escape_jinja(extraction), 4, SPARK).lstrip()} as property_values
from {{{{ ref('{USERS_MODEL}') }}}}
{{%- if not plan.full %}}
where {{{{ changed_users_filter(plan) }}}}
{{%- endif %}}
"""


def _flattened(attributes: list[Attribute], header: str) -> str:
    _, columns = flattened_columns(attributes, SPARK)
    selected = [
        f"    -- {escape_jinja(label)}\n    {_indent(escape_jinja(sql), 4, SPARK).lstrip()} as {name}"
        for label, sql, name in columns
    ]
    body = ",\n".join(["    user_key", "    user_id", *selected])
    return f"""{header}
-- One typed column per property an audience reads (`<property>__text`, `__number`, ...), for the
-- users this build evaluates. Kept as versions (materialized `versioned_table`): an incremental
-- build writes only the re-evaluated users' rows (a delta), a full or compacting one every row (a
-- base); the model's relation is a view of the committed state (macros/incremental.sql).

{{{{ config(materialized='versioned_table') }}}}

{{%- set plan = build_plan() %}}
-- depends_on: {{{{ ref('{REEVALUATE_MODEL}') }}}}

select
{body}
from {{{{ ref('{EXTRACTED_MODEL}') }}}}
{{%- if not plan.full %}}

union all

-- the users re-evaluated without a change of their own (a time window "now" moved over) as the
-- last committed build left them; a compacting build keeps every other user too (a deleted
-- user's row goes). The users' keys are broadcast, whatever their size: joined by a shuffle they
-- would move every kept row, so that a warm build's shuffle follows the table, not the changed users
select /*+ BROADCAST(changed, reevaluated) */ kept.*
from {{{{ this }}}} as kept
left anti join (
    select user_key from {{{{ source('raw', 'users') }}}}
    where {{{{ changed_users_filter(plan) }}}}
) as changed
    on kept.user_key = changed.user_key
{{%- if not plan.compacting %}}
left semi join {{{{ ref('{REEVALUATE_MODEL}') }}}} as reevaluated
    on kept.user_key = reevaluated.user_key
{{%- endif %}}
{{%- endif %}}
"""


def _audience_model(definition: AudienceDefinition, compiled: _SparkAudience) -> str:
    header = GENERATED_HEADER.format(
        source=_comment(definition.file.parent.name + "/audience.json")
    )
    about = (
        f"-- Audience `{definition.key}` (dynamic, version {definition.version}): "
        f"{_comment(definition.name)}"
    )
    return f"""{escape_jinja(header)}
{escape_jinja(about)}

{{{{ config(materialized='view') }}}}

select
    user_key,
    user_id,
    cast(null as string) as tenant
from {{{{ ref('{EVALUATED_USERS_MODEL}') }}}}
where
{_indent(compiled.where, 4, SPARK)}
"""


def _literal(value: object) -> str:
    return escape_jinja(render(exp.convert(value), dialect=SPARK))


def _catalog(audiences: list[AudienceDefinition], unsupported: dict[str, str], header: str) -> str:
    rows = [f"    ({_literal(d.key)}, {_literal(d.version)})" for d in audiences]
    left_out = "".join(
        f"\n-- not on Spark: {escape_jinja(_comment(key))}: {escape_jinja(_comment(reason))}"
        for key, reason in sorted(unsupported.items())
    )
    values = (
        "select audience_key, audience_version from values\n"
        + ",\n".join(rows)
        + "\nas audiences (audience_key, audience_version)"
        if rows
        else "select cast(null as string) as audience_key, cast(null as string) as audience_version where false"
    )
    return f"""{header}
-- The audiences this evaluation covers: the membership diff compares exactly these.{left_out}

{{{{ config(materialized='table') }}}}

{values}
"""


def _members(audiences: list[AudienceDefinition], header: str) -> str:
    branches = [
        f"select {_literal(d.key)} as audience_key, user_key, user_id, tenant\n"
        f"from {{{{ ref('{d.model_name}') }}}}"
        for d in audiences
    ]
    union = (
        "\n\nunion all\n\n".join(branches)
        if branches
        else "select cast(null as string) as audience_key, cast(null as int) as user_key, "
        "cast(null as string) as user_id, cast(null as string) as tenant where false"
    )
    return f"""{header}
-- (audience_key, user_key, user_id, tenant): every Spark audience's members at this evaluation.
-- Kept as versions (materialized `versioned_table`): the audiences read only the users this build
-- evaluates, so an incremental build writes their rows only (a delta); a compacting build adds
-- everyone else's as the last committed build left them (a new base). The model's relation is a
-- view of the committed state (macros/incremental.sql).

{{{{ config(materialized='versioned_table') }}}}

{{%- set plan = build_plan() %}}
-- depends_on: {{{{ ref('{REEVALUATE_MODEL}') }}}}

{union}
{{%- if plan.compacting %}}

union all

-- a new base: every other user's memberships as the last committed build left them
select kept.audience_key, kept.user_key, kept.user_id, kept.tenant
from {{{{ this }}}} as kept
left anti join {{{{ ref('{REEVALUATE_MODEL}') }}}} as reevaluated
    on kept.user_key = reevaluated.user_key
{{%- endif %}}
"""


def _reevaluate(
    audiences: list[AudienceDefinition], placeholders: _Placeholders, header: str
) -> str:
    """`int_users_to_reevaluate`: the users an incremental build re-evaluates (every Spark
    audience reads only the user's own properties, other such audiences, and "now")."""
    keys_by_window: dict = {}
    for definition in audiences:
        for window in time_windows(definition.segments):
            keys_by_window.setdefault(window, []).append(definition.key)
    taken = placeholders.now + json.dumps(
        [list(w.attribute.path) for w in keys_by_window], ensure_ascii=False
    )
    previous, current = _placeholder("previous_now", taken), _placeholder("current_now", taken)
    predicates = []
    for window, keys in sorted(
        keys_by_window.items(), key=lambda item: (item[0].attribute.path, item[0].minutes)
    ):
        predicate = render(
            window.moved_over(window.attribute.column(), exp.column(previous), exp.column(current)),
            dialect=SPARK,
        )
        about = (
            f"-- {', '.join(keys)}: recipient.{'.'.join(window.attribute.path)} against now "
            f"{window.minutes:+d} minutes"
        )
        text = escape_jinja(f"{_comment(about)}\n{predicate}")
        for name, jinja in ((previous, "{{ previous_now }}"), (current, "{{ current_now }}")):
            text = text.replace(f"`{name}`", jinja).replace(name, jinja)
        predicates.append(_indent(text, 8, SPARK))
    # One scan of the committed typed columns for every window (`committed_state`: the last
    # committed build's rows, so no dependency on this build's version of the table).
    windows = (
        '\n\n    union all\n\n    -- users with a timestamp that "now" moved over since the last '
        f"committed build\n    select user_key\n    from {{{{ committed_state('{FLATTENED_MODEL}') }}}}"
        "\n    where\n" + "\n        or\n".join(predicates)
        if predicates
        else ""
    )
    return f"""{header}
-- The users an incremental build re-evaluates, in every audience: those loaded, changed or deleted
-- since the last committed build, and those with a timestamp that "now" moved over since then,
-- where a time-relative condition may have changed. Empty in a full build, which evaluates
-- everyone. The post-hook logs them (raw.reevaluation_log): they are this build's tombstones,
-- whose rows its versions replace (macros/incremental.sql).

{{{{ config(materialized='table', post_hook="{{{{ log_reevaluated_users() }}}}") }}}}

{{%- set plan = build_plan() %}}
{{%- set previous_now = timestamp_literal(plan.previous_now) %}}
{{%- set current_now = evaluation_time() %}}

{{%- if plan.full %}}

select cast(null as int) as user_key where false

{{%- else %}}

select distinct user_key
from (

    -- users loaded, changed or deleted since the last committed build
    select user_key
    from {{{{ source('raw', 'users') }}}}
    where {{{{ changed_users_filter(plan) }}}}{windows}

) as candidates

{{%- endif %}}
"""


def _plan(models_hash: str, header: str) -> str:
    """`int_build_plan`: one row, whether this build is full or incremental and from where
    (macros/incremental.sql decides it from the last completion marker)."""
    return f"""{header}
-- This build's plan, one row: full (every user evaluated) or incremental (since the last committed
-- build: its run, evaluation time and newest user change), whether it writes new bases of the
-- versioned tables (full, or compacting), its place in the chain of committed builds, and the
-- newest user change it covers. `models_hash` is the hash of the other generated models: a build
-- after they changed is full.

{{{{ config(materialized='table') }}}}

{{%- set plan = plan_build('{models_hash}') %}}
{{%- if plan.reason %}}{{{{ log("build plan: " ~ plan.reason, info=true) }}}}{{%- endif %}}

select
    {{{{ 'true' if plan.full else 'false' }}}} as full_build,
    {{{{ 'true' if plan.writes_base else 'false' }}}} as writes_base,
    {{{{ plan.build_sequence }}}} as build_sequence,
    {{{{ run_id_literal(plan.after_run) }}}} as after_run,
    {{{{ timestamp_literal(plan.previous_now) }}}} as previous_now,
    {{{{ timestamp_literal(plan.users_after) }}}} as users_after,
    {{{{ timestamp_literal(plan.users_through) }}}} as users_through,
    '{models_hash}' as models_hash,
    {{{{ evaluation_time() }}}} as evaluated_at
"""


def write_spark_models(files: list[GeneratedFile], project_dir: Path) -> list[Path]:
    """Write the generated files that changed and remove stale ones; returns what changed."""
    return write_models(files, project_dir, SPARK_GENERATED_FOLDERS)


def spark_drift(files: list[GeneratedFile], project_dir: Path) -> list[str]:
    """Generated files that are missing, different or stale (for `generate --target spark --check`)."""
    return drift(files, project_dir, SPARK_GENERATED_FOLDERS)


# ---------------------------------------------------------------------------------------------
# Running the Spark project.


class SparkTargetError(ValueError):
    """The Spark target cannot be used (no Java runtime, a cluster that does not answer): one line."""


def check_java(environ: dict[str, str] | None = None) -> None:
    """Fail with one line when no Java runtime is there for Spark (JAVA_HOME, else `java` on PATH)."""
    environ = os.environ if environ is None else environ
    home = environ.get("JAVA_HOME")
    if home:
        if not (Path(home) / "bin" / "java").exists():
            raise SparkTargetError(
                f"JAVA_HOME={home} has no bin/java: Spark needs a Java runtime "
                "(apt-get install openjdk-17-jre-headless, or unset JAVA_HOME)"
            )
        return
    if shutil.which("java", path=environ.get("PATH")) is None:
        raise SparkTargetError(
            "no Java runtime: Spark needs one (JAVA_HOME or `java` on PATH; "
            "apt-get install openjdk-17-jre-headless)"
        )


def check_reachable(
    host: str, port: int, setting: str = "--spark-host, --spark-port or AUDIENCES_SPARK_HOST, _PORT"
) -> None:
    """Fail with one line naming the setting when a cluster target does not accept a connection."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS):
            return
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise SparkTargetError(
            f"the Spark target at {host}:{port} ({setting}) is not reachable: {reason}"
        ) from None


# What a build logs (macros/incremental.sql, macros/membership.sql).
_BUILD_KIND = re.compile(r"((?:full|incremental) build: [^\n]*)")
_REEVALUATED = re.compile(r"incremental build: (\d+) users re-evaluated")
_PUBLISHED = "membership events published"
# The runs whose partitions a committed build dropped (prune_versions, macros/incremental.sql).
_PRUNED = re.compile(r"(superseded|uncommitted) builds pruned: ([0-9A-Za-z -]*)")


def committed_chain(warehouse_dir: Path, committed_run: str):
    """The committed Spark builds from `committed_run` back to the first, newest first, as
    (the parquet files of its events partition, run id, evaluation time in UTC), each read from
    its completion marker, which names the build before it (`after_run`). Local warehouses: the
    files Spark wrote (`<warehouse>/membership_events_published/run_id=<run>/`); an attached
    partition is known from its marker, never from a folder merely being there (a build killed
    before it attached its folder leaves one)."""
    import duckdb

    run = committed_run
    with duckdb.connect() as connection:
        while run:
            folder = Path(warehouse_dir) / EVENTS_FOLDER / f"run_id={run}"
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: no published Spark build {run} there")
            files = str(folder / "*.parquet")
            marker = connection.execute(
                "select evaluated_at, after_run from read_parquet($files) "
                "where event_type = 'committed'",
                {"files": files},
            ).fetchall()
            if len(marker) != 1:
                raise ValueError(
                    f"Spark build {run}: {len(marker)} completion markers, expected one"
                )
            evaluated_at, after_run = marker[0]
            moment = (
                evaluated_at.replace(tzinfo=UTC)
                if evaluated_at.tzinfo is None
                else evaluated_at.astimezone(UTC)
            )
            yield files, run, moment
            run = after_run


@dataclass(frozen=True)
class SparkBuild:
    """One Spark build, as its output tells it: full or incremental (and how many users it
    re-evaluated), and the run that committed (None when nothing committed)."""

    evaluated_at: datetime
    output: str
    kind: str | None
    users_reevaluated: int | None
    published: str | None
    committed_run: str | None

    @classmethod
    def of(cls, output: str, evaluated_at: datetime) -> SparkBuild:
        kind = _BUILD_KIND.findall(output)
        reevaluated = _REEVALUATED.findall(output)
        published = [line.strip() for line in output.splitlines() if _PUBLISHED in line]
        committed = COMMITTED.findall(output)
        return cls(
            evaluated_at=evaluated_at,
            output=output,
            kind=kind[-1].strip() if kind else None,
            users_reevaluated=int(reevaluated[-1]) if reevaluated else None,
            published=published[-1] if published else None,
            committed_run=committed[-1] if committed else None,
        )

    @property
    def full(self) -> bool:
        return bool(self.kind and self.kind.startswith("full"))

    def summary(self) -> str:
        """One line: when, which kind of build, what was published."""
        return (
            f"evaluated on Spark at {self.evaluated_at.isoformat()} "
            f"({self.kind or 'no build'}); {self.published or 'no events published'}"
        )


def spark_run_for(settings, warehouse: Path | None = None, **target) -> SparkRun:
    """The Spark run of these settings (`audiences.settings`: the Spark project beside the dbt
    project, AUDIENCES_SPARK_WAREHOUSE, _TARGET, _HOST, _PORT); `warehouse` and the keyword
    arguments `target`, `host`, `port` (flags) win when not None."""
    given = {key: value for key, value in target.items() if value is not None}
    return SparkRun(
        spark_project_dir(settings.dbt_project_dir),
        Path(warehouse or settings.spark_warehouse).resolve(),
        target=given.get("target", settings.spark_target),
        host=given.get("host", settings.spark_host),
        port=given.get("port", settings.spark_port),
    )


@dataclass(frozen=True)
class SparkRun:
    """Where a Spark evaluation runs: the dbt project, the warehouse folder (tables, metastore)
    and the dbt target (`spark`: in this machine's process; `cluster`: thrift to a host)."""

    project_dir: Path
    warehouse_dir: Path
    target: str = "spark"
    host: str | None = None
    port: int = 10000

    def environment(
        self, evaluation_time: datetime | None = None, users_parquet: Path | None = None
    ) -> dict[str, str]:
        """dbt's environment. The run's evaluation time and users' parquet are environment
        variables, not `--vars`: dbt re-parses the whole project when its vars change (seconds
        each run), and the Spark project's macros read these variables only while executing
        (`run_setting` in macros/evaluation_time.sql), so a new value re-parses nothing."""
        values = {
            **{
                name: value
                for name, value in os.environ.items()
                if name not in (EVALUATION_TIME_VARIABLE, USERS_PARQUET_VARIABLE)
            },
            "AUDIENCES_SPARK_WAREHOUSE": str(Path(self.warehouse_dir).resolve()),
            "AUDIENCES_DBT_TARGET": self.target,
        }
        if evaluation_time is not None:
            values[EVALUATION_TIME_VARIABLE] = evaluation_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if users_parquet is not None:
            values[USERS_PARQUET_VARIABLE] = str(Path(users_parquet).resolve())
        if self.host:
            values["AUDIENCES_SPARK_HOST"] = self.host
            values["AUDIENCES_SPARK_PORT"] = str(self.port)
        return values

    def command(self) -> list[str]:
        """`dbt run` on the project; the run's settings are in `environment`."""
        from audiences.dbt.project import dbt_executable

        return [
            dbt_executable(),
            "run",
            "--project-dir",
            str(self.project_dir),
            "--profiles-dir",
            str(self.project_dir),
        ]

    def check(self) -> None:
        """The one-line checks made before anything is written."""
        if self.target == "cluster":
            if not self.host:
                raise SparkTargetError(
                    "the Spark target `cluster` needs a host: --spark-host or AUDIENCES_SPARK_HOST"
                )
            check_reachable(self.host, self.port)
        else:
            check_java()

    def start(
        self, evaluation_time: datetime, users_parquet: Path | None = None
    ) -> subprocess.Popen:
        """`run` as a process of its own (its own process group), its output in a pipe."""
        self.check()
        Path(self.warehouse_dir).mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            self.command(),
            env=self.environment(evaluation_time, users_parquet),
            cwd=self.warehouse_dir,  # Spark's and Derby's own logs land there
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def run(self, evaluation_time: datetime, users_parquet: Path | None = None) -> str:
        """Evaluate every Spark audience at `evaluation_time` and publish the membership events
        (one `dbt run`; `users_parquet` first replaces `raw.users` with those users). Returns
        dbt's output."""
        process = self.start(evaluation_time, users_parquet)
        output, _ = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"`dbt run` on Spark failed:\n{output[-6000:]}")
        if COMMITTED.findall(output) and self.target == "spark":
            self.remove_pruned_folders(output)
        return output

    def build(self, evaluation_time: datetime, users_parquet: Path | None = None) -> SparkBuild:
        """`run`, and what its output says (what `audiences spark-run` and the Dagster Spark
        assets report)."""
        return SparkBuild.of(self.run(evaluation_time, users_parquet), evaluation_time)

    def remove_pruned_folders(self, output: str) -> list[Path]:
        """Delete the folders of the partitions a committed build pruned (its output lists their
        runs, `prune_versions` in macros/incremental.sql): the versions and re-evaluation logs of
        builds superseded by a newer base, and of builds that never committed (with their staged
        events). Local warehouses only: on a cluster, the storage's lifecycle rules do it.
        Returns the folders removed."""
        warehouse = Path(self.warehouse_dir)
        removed = []
        for kind, runs in _PRUNED.findall(output):
            for run in runs.split():
                folders = [
                    *warehouse.glob(f"versions/*/run_id={run}"),
                    warehouse / "reevaluation_log" / f"run_id={run}",
                ]
                if kind == "uncommitted":
                    folders.append(warehouse / EVENTS_FOLDER / f"run_id={run}")
                for folder in folders:
                    if folder.is_dir():
                        shutil.rmtree(folder)
                        removed.append(folder)
        return removed

    def member_counts(self, run_id: str) -> dict[str, int]:
        """Members per audience as the committed build `run_id` left them (every audience it
        evaluated, those with none included), without starting Spark: the memberships its history
        leaves open (entries less exits, over the committed builds back from it), which the
        committed audience_members equals by construction (both switch with one partition). Local
        warehouses only: a cluster's storage is not read from here."""
        import duckdb

        files = [partition for partition, _, _ in committed_chain(self.warehouse_dir, run_id)]
        with duckdb.connect() as connection:
            evaluated = connection.execute(
                "select audience_key from read_parquet($files) where event_type = 'evaluated'",
                {"files": files[0]},
            ).fetchall()
            counts = dict(
                connection.execute(
                    "select audience_key, count(*) filter (where event_type = 'entered') "
                    "- count(*) filter (where event_type = 'exited') "
                    "from read_parquet($files) group by all",
                    {"files": files},
                ).fetchall()
            )
        return {key: counts.get(key, 0) for (key,) in sorted(evaluated)}

    def query(self, sql: str) -> list[dict]:
        """Rows of one query on the target, through dbt (`dbt show`; one Spark start)."""
        from audiences.dbt.project import dbt_executable

        self.check()
        command = [
            dbt_executable(),
            "--quiet",
            "show",
            "--inline",
            sql,
            "--limit",
            "-1",
            "--output",
            "json",
            "--project-dir",
            str(self.project_dir),
            "--profiles-dir",
            str(self.project_dir),
        ]
        result = subprocess.run(
            command, env=self.environment(), cwd=self.warehouse_dir, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"`dbt show` on Spark failed:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
            )
        start = result.stdout.index("{")
        return json.loads(result.stdout[start:])["show"]
