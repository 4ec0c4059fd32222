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
