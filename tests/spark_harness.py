"""Test support: one local SparkSession, and compiled conditions evaluated on it and on DuckDB.

Differential testing: the same users (their JSON documents exactly as DuckDB stores them) and the
same conditions, compiled for each dialect, must select the same users. Real Spark (pyspark's
bundled engine, `local[1]`), real DuckDB, real compiler.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime

import duckdb
import pytest
from condition_harness import NOW
from sqlglot import exp

from audiences.conditions.compiler import (
    DIALECT,
    SPARK,
    Attribute,
    CompileContext,
    Condition,
    attribute_expression,
    attributes_used,
    compile_segments,
    property_json,
    render,
    timestamp_literal,
)
from audiences.dbt.models import flattened_columns

# Conditions evaluated per query: one query per condition costs Spark seconds of planning each.
CHUNK = 300

# The tests' JVMs run for a minute or two on small tables: the quick JIT compiler alone, one
# compiler thread and the serial collector cost a third less CPU than the JVM's defaults (measured
# on test_spark_dialect: 240 against 151 CPU s). Each JVM also loads some 15,000 classes of
# Spark, Hive and Hadoop from pyspark's own jars before its first query: they are not re-verified
# (a `dbt show` on the Spark project, JVM CPU: 14.2-14.9 against 12.0 s). dbt-spark's sessions get
# these through AUDIENCES_SPARK_DRIVER_JAVA_OPTIONS (dbt_spark/profiles.yml), which
# tests/conftest.py sets.
TEST_JVM_OPTIONS = (
    "-XX:TieredStopAtLevel=1 -XX:CICompilerCount=1 -XX:+UseSerialGC"
    " -XX:+UnlockDiagnosticVMOptions -XX:-BytecodeVerificationRemote"
)

# A local session like the `spark` target's (dbt_spark/profiles.yml).
SPARK_CONFIG = {
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.enabled": "false",
    "spark.sql.shuffle.partitions": "1",
    "spark.sql.catalogImplementation": "in-memory",
    "spark.driver.memory": "1g",
    "spark.driver.extraJavaOptions": TEST_JVM_OPTIONS,
    # Strict: a cast that can fail must be a try_cast (Databricks SQL's default; dbt-spark turns
    # it off, where such a cast would silently give NULL).
    "spark.sql.ansi.enabled": "true",
    # Only the loopback interface: a local session needs no other.
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
}


def require_spark() -> None:
    """Skip, saying why, where pyspark or Java is missing; CI installs both (`.ci/run`), so there
    a missing one fails instead of skipping."""
    missing = None
    try:
        import pyspark  # noqa: F401
    except ImportError:
        missing = 'pyspark is not installed (pip install -e ".[spark]")'
    if missing is None and shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        missing = "no Java runtime (apt-get install openjdk-17-jre-headless)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"Spark tests need it in CI: {missing}")
        pytest.skip(missing)


def spark_session():
    """The process's local SparkSession (started once, ~20-40 s on two cores).

    Skipped, saying why, where pyspark or Java is missing; CI installs both (`.ci/run`), so there
    a missing one fails instead of skipping.
    """
    require_spark()
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    import tempfile

    builder = SparkSession.builder.master("local[1]").appName("audiences-tests")
    # Spark makes its warehouse folder at start: a temporary one, not ./spark-warehouse.
    builder = builder.config("spark.sql.warehouse.dir", tempfile.mkdtemp(prefix="spark-warehouse-"))
    for key, value in SPARK_CONFIG.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


def load_users(spark, connection: duckdb.DuckDBPyConnection, view: str = "users") -> None:
    """`raw.users` of this DuckDB connection as the Spark temp view `view` (same JSON text)."""
    rows = connection.execute(
        "select user_key, user_id, cast(properties as varchar) from raw.users order by user_key"
    ).fetchall()
    frame = spark.createDataFrame(rows, "user_key int, user_id string, properties string")
    frame.createOrReplaceTempView(view)


def _context(dialect: str, members: dict[str, set[str]], flattened: bool, now: datetime):
    def audience_members(key: str) -> exp.Expression:
        ids = sorted(members.get(key, set()))
        listed = (
            exp.Array(expressions=[exp.Literal.string(i) for i in ids])
            if ids
            else exp.cast(exp.Array(), "varchar[]")
        )
        table = "raw.users" if dialect == DIALECT else "users"
        return (
            exp.select("user_key")
            .from_(table)
            .where(exp.ArrayContains(this=listed, expression=exp.column("user_id")))
        )

    if flattened:

        def attribute(a: Attribute) -> exp.Expression:
            return exp.column(a.column_name, quoted=True)
    else:

        def attribute(a: Attribute) -> exp.Expression:
            value = property_json(a.path, exp.column("properties"), exp.column("user_id"), dialect)
            return attribute_expression(value, a.variant, dialect)

    return CompileContext(
        attribute=attribute,
        audience_members=audience_members,
        evaluation_time=timestamp_literal(now),
        user_key=exp.column("user_key"),
        user_id=exp.column("user_id"),
    )


def flattened_statements(attributes: list[Attribute], dialect: str) -> list[str]:
    """The typed-column table int_users_flattened builds, in two steps: the properties parsed out
    of each user's JSON (`extracted`), then the typed columns (`flattened`). One projection would
    let Spark's optimizer inline the parse into every column, which costs it minutes of planning."""
    source = "raw.users" if dialect == DIALECT else "users"
    build = "cache table" if dialect == SPARK else "create or replace temp table"
    extraction, columns = flattened_columns(attributes, dialect)
    selected = ", ".join(["user_key", "user_id"] + [f"{sql} as {name}" for _, sql, name in columns])
    return [
        f"{build} extracted as select user_key, user_id, properties, {extraction} "
        f"as property_values from {source}",
        f"{build} flattened as select {selected} from extracted",
    ]


def matches(
    run,
    dialect: str,
    audiences: list[list[list[Condition]]],
    members: dict[str, set[str]] | None = None,
    flattened: bool = False,
    now: datetime = NOW,
) -> list[set[str]]:
    """For each audience (segments of conditions), the ids of the users it selects, in one query
    per `CHUNK` audiences. `run(sql)` returns rows of (user_id, bool, bool, ...)."""
    members = members or {}
    context = _context(dialect, members, flattened, now)
    source = "raw.users" if dialect == DIALECT else "users"
    if flattened:
        used = set().union(*(attributes_used(segments) for segments in audiences))
        attributes = sorted(used, key=lambda a: (a.path, a.variant))
        # Built once, as dbt builds the table (Spark: cached, so each query reads typed columns).
        for statement in flattened_statements(attributes, dialect):
            run(statement)
        source = "flattened"
    found: list[set[str]] = []
    for start in range(0, len(audiences), CHUNK):
        chunk = audiences[start : start + CHUNK]
        columns = [
            f"{render(compile_segments(segments, context), pretty=False, dialect=dialect)} as m{i}"
            for i, segments in enumerate(chunk)
        ]
        rows = run(f"select user_id, {', '.join(columns)} from {source}")
        found += [{row[0] for row in rows if row[i + 1]} for i in range(len(chunk))]
    return found


def on_duckdb(connection: duckdb.DuckDBPyConnection):
    return lambda sql: connection.execute(sql).fetchall()


def on_spark(spark):
    def run(sql: str) -> list[tuple]:
        if sql.startswith("cache table"):  # a cached temp view: replaced, not kept
            spark.catalog.dropTempView(sql.split()[2])
        return [tuple(row) for row in spark.sql(sql).collect()]

    return run


__all__ = [
    "DIALECT",
    "SPARK",
    "load_users",
    "matches",
    "on_duckdb",
    "on_spark",
    "require_spark",
    "spark_session",
]
