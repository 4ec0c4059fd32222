"""The warehouse's writer lock: a run that waits says which run it waits for."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from audiences.warehouse.lock import hold_writer_lock, lock_path

# A holder that takes the lock, is slow to write who it is (as a run is between its `flock` and
# its record), then holds it a moment longer and exits, which releases it.
SLOW_HOLDER = textwrap.dedent(
    """
    import fcntl, json, os, sys, time
    path = sys.argv[1]
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(0.4)
    os.pwrite(descriptor, json.dumps({"run_id": "r-1", "pid": os.getpid()}).encode(), 0)
    time.sleep(0.6)
    """
)


def test_a_waiting_run_names_a_holder_that_has_not_written_its_record_yet(tmp_path):
    warehouse = tmp_path / "warehouse.duckdb"
    reports: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-c", SLOW_HOLDER, str(lock_path(warehouse))],
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with hold_writer_lock(warehouse, {"job": "audiences_job"}, report=reports.append):
            waited = time.monotonic() - started
    assert waited >= 0.5
    assert len(reports) == 1
    assert f"run r-1 (pid {holder.pid})" in reports[0], reports
    assert reports[0].endswith("is writing this warehouse; waiting for it to finish")
    # The lock was released and its file removed.
    assert not lock_path(warehouse).exists()


# A process that holds the warehouse as a command reading it does, for a moment.
READER = textwrap.dedent(
    """
    import sys, time
    from audiences.warehouse.queries import reading
    with reading(sys.argv[1]) as connection:
        connection.execute("select count(*) from t").fetchall()
        print("reading", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)

# A process that writes the warehouse as a run does, for a moment.
WRITER = textwrap.dedent(
    """
    import sys, time
    from audiences.warehouse.lock import hold_writer_lock
    from audiences.warehouse.queries import connect
    with hold_writer_lock(sys.argv[1], {"run_id": "run-7", "job": "audiences_job"}):
        with connect(sys.argv[1]) as connection:
            connection.execute("insert into t values (2)")
        print("writing", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def _warehouse(tmp_path):
    import duckdb

    warehouse = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(warehouse)) as connection:
        connection.execute("create table t (n integer); insert into t values (1)")
    return warehouse


def _started(script: str, warehouse, seconds: float, ready: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(warehouse), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == ready
    return process


def test_a_run_waits_for_a_command_reading_the_warehouse_instead_of_failing(tmp_path):
    from audiences.warehouse.queries import connect

    warehouse = _warehouse(tmp_path)
    reports: list[str] = []
    with _started(READER, warehouse, 1.0, "reading") as reader:
        started = time.monotonic()
        # Before, the run's next step opened the file while the reader had it: DuckDB refused it
        # ("cannot open the warehouse ... Conflicting lock"), and the run failed.
        with (
            hold_writer_lock(warehouse, {"job": "audiences_job"}, report=reports.append),
            connect(warehouse) as connection,
        ):
            waited = time.monotonic() - started
            connection.execute("insert into t values (3)")
    assert reader.returncode == 0
    assert waited >= 0.5
    assert reports == [
        f"{warehouse}: a command reading this warehouse (preview, explain, members) is using it; "
        "waiting for it to finish"
    ]


def test_a_reader_waits_for_the_run_writing_and_names_it(tmp_path):
    from audiences.warehouse.queries import reading

    warehouse = _warehouse(tmp_path)
    reports: list[str] = []
    with _started(WRITER, warehouse, 1.0, "writing") as writer:
        started = time.monotonic()
        with reading(warehouse, report=reports.append) as connection:
            waited = time.monotonic() - started
            rows = connection.execute("select n from t order by n").fetchall()
    assert writer.returncode == 0
    assert waited >= 0.5
    assert rows == [(1,), (2,)]  # what the run wrote, once it was done
    assert len(reports) == 1 and f"run run-7 (audiences_job, pid {writer.pid}" in reports[0]
    assert not lock_path(warehouse).exists()


def test_readers_share_the_warehouse_and_a_run_inside_reads_without_waiting(tmp_path):
    from audiences.warehouse.queries import reading

    warehouse = _warehouse(tmp_path)
    with _started(READER, warehouse, 2.0, "reading") as reader:
        started = time.monotonic()
        with reading(warehouse) as connection:
            assert connection.execute("select count(*) from t").fetchone() == (1,)
        assert time.monotonic() - started < 1.5  # not behind the other reader
        reader.wait(timeout=10)
    # A run reading its own warehouse (spelled another way) takes nothing more.
    with hold_writer_lock(warehouse, {"job": "audiences_job"}):
        started = time.monotonic()
        with reading(tmp_path / "." / "warehouse.duckdb") as connection:
            assert connection.execute("select count(*) from t").fetchone() == (1,)
        assert time.monotonic() - started < 1.0
    assert not lock_path(warehouse).exists()
