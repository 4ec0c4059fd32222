"""Shared fixtures: an in-memory DuckDB, and one real run of the main job on the sample data."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from condition_harness import ROOT, SAMPLE_TIME, connect_memory, copy_dbt_project, dbt_project_files
from spark_harness import TEST_JVM_OPTIONS

# The tests' files (warehouses, stores, Dagster's run history, dbt projects) are written with an
# fsync per commit: a warm pipeline run makes ~1,800 of them, about 8 s of waiting on this disk.
# The tests check what is written, not that it survives a power cut, so where the machine has a
# large memory-backed /dev/shm they go there (a small one, as in a container, is left alone).
MEMORY_TEMP_ROOT = Path("/dev/shm")
MEMORY_TEMP_MIN_FREE = 8 * 2**30


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker more than the cores this process may use. Much of a worker's time is
    spent waiting on other processes (dbt and Dagster subprocesses, served APIs, the JVM, the
    Knock CLI): with one worker per core both cores sat idle for about a quarter of the run."""
    return len(os.sched_getaffinity(0)) + 1


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Put the session's temporary folders (pytest's, and every `tempfile` user's, the
    subprocesses' included) in memory, unless TMPDIR or --basetemp already says where. The
    Spark runs' JVMs start with the tests' options (spark_harness.TEST_JVM_OPTIONS)."""
    os.environ.setdefault("AUDIENCES_SPARK_DRIVER_JAVA_OPTIONS", TEST_JVM_OPTIONS)
    if os.environ.get("TMPDIR") or config.option.basetemp:
        return
    try:
        free = shutil.disk_usage(MEMORY_TEMP_ROOT).free
    except OSError:
        return
    if free >= MEMORY_TEMP_MIN_FREE and os.access(MEMORY_TEMP_ROOT, os.W_OK):
        os.environ["TMPDIR"] = str(MEMORY_TEMP_ROOT)
        tempfile.tempdir = str(MEMORY_TEMP_ROOT)


def pytest_collection_modifyitems(items):
    """The files marked slow first (each keeps its tests' order): with `--dist loadfile
    --no-loadscope-reorder` the workers take the long files while there are many left, and the
    quick ones fill in at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def dagster_home(tmp_path_factory):
    """`audiences run` records its runs in the Dagster instance of DAGSTER_HOME (by default the
    working folder's `dagster_home`, which `dg dev` shows): the tests' go to a temporary one."""
    folder = tmp_path_factory.mktemp("dagster_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(folder))
        yield folder


@pytest.fixture(scope="session")
def dbt_project_copy(tmp_path_factory):
    """The session's copy of the engine's dbt project, for the runs of the sample definitions."""
    return copy_dbt_project(tmp_path_factory.mktemp("engine") / "dbt_project")


@pytest.fixture(scope="session", autouse=True)
def repository_dbt_project_is_left_alone(dbt_project_copy):
    """No test writes the repository's dbt project: `audiences run` and `audiences generate` in a
    test write the session's copy (AUDIENCES_DBT_PROJECT), and loading the code location never
    writes models. Otherwise a plain `pytest` would regenerate the models it then checks."""
    before = dbt_project_files(ROOT / "dbt_project")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUDIENCES_DBT_PROJECT", str(dbt_project_copy))
        yield
    after = dbt_project_files(ROOT / "dbt_project")
    changed = sorted(
        name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
    )
    assert not changed, f"the tests wrote the repository's dbt project: {changed}"


@pytest.fixture
def memory_connection():
    connection = connect_memory()
    yield connection
    connection.close()


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory, dbt_project_copy):
    """The main job run once on the sample data, on a temporary DuckDB file, at a fixed time."""
    from audiences import cli

    folder = tmp_path_factory.mktemp("sample_run")
    warehouse = folder / "warehouse.duckdb"
    # Triggers go to a file sink in the temporary folder, never into the repository.
    (folder / "sinks.yml").write_text(
        "default: file\nsinks:\n  file: {type: file, path: out/triggers.jsonl}\n"
    )
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("AUDIENCES_")]:
            patch.delenv(name)
        patch.chdir(ROOT)
        # The run's Dagster history is kept, as under `dg dev`, for the tests of what the UI shows.
        (folder / "dagster_home").mkdir()
        patch.setenv("DAGSTER_HOME", str(folder / "dagster_home"))
        code = cli.main(
            [
                "--duckdb",
                str(warehouse),
                "--sinks",
                str(folder / "sinks.yml"),
                "--dbt-project",
                str(dbt_project_copy),
                "--evaluation-time",
                SAMPLE_TIME,
                "run",
            ]
        )
    assert code == 0, "the main job failed on the sample data"
    return warehouse


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for the session (see `postgres_server.py`); skips when there is none."""
    from postgres_server import start_postgres

    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture
def store(tmp_path):
    """A fresh membership store: a SQLite file in the test's temporary folder, or, when
    AUDIENCES_TEST_STORE_URL names a PostgreSQL database, that database emptied first (the same
    tests then check that the store's SQL is portable)."""
    from audiences.store.database import MembershipStore, metadata

    url = os.environ.get("AUDIENCES_TEST_STORE_URL") or f"sqlite:///{tmp_path}/store.sqlite"
    opened = MembershipStore(url)
    if not url.startswith("sqlite"):
        metadata.drop_all(opened.engine)
    opened.create()
    yield opened
    opened.dispose()
