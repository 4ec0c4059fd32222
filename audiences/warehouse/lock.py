"""One run writes the warehouse at a time, whoever started it: `audiences run`, a sensor, a schedule.

DuckDB allows one writing process, and a run opens the warehouse many times (each step, each dbt
command). Two overlapping runs would take turns at the file until one of them found it taken and
failed, then the other, leaving the outbox half published. Dagster's tag concurrency
(`dagster_home/dagster.yaml`) serializes the runs its daemon launches, but not `audiences run`,
which executes the job in its own process. So every run that writes the warehouse holds an
exclusive lock on a file beside it (`<warehouse>.run-lock`, removed when the run ends) from its
start to its end, and a second run waits for it, saying which run it waits for. The operating
system releases the lock when its holder exits, even when killed, so a crashed run never blocks the
next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

# How often a waiting run says again what it waits for.
REPORT_EVERY_SECONDS = 60.0
# How long a waiter gives the holder to write who it is, once it has the lock.
HOLDER_RECORD_WAIT_SECONDS = 2.0

_held: dict[
    Path, tuple[int, int, dict]
] = {}  # lock path -> (descriptor, holds, record), this process
_guard = threading.Lock()


def lock_path(duckdb_path: Path) -> Path:
    """The lock file of a warehouse: beside it, `warehouse.duckdb.run-lock`."""
    duckdb_path = Path(duckdb_path)
    return duckdb_path.with_name(duckdb_path.name + ".run-lock")


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(path: Path, wait_seconds: float = 0.0) -> str:
    """What the lock file says about the run holding it, in words. A holder writes its record just
    after it takes the lock, so a waiter that looks in between finds the file empty: it waits up to
    `wait_seconds` for the record to appear."""
    deadline = time.monotonic() + wait_seconds
    holder = _read_holder(path)
    while not holder and time.monotonic() < deadline:
        time.sleep(0.02)
        holder = _read_holder(path)
    if not holder:
        return "another run"
    parts = [f"run {holder['run_id']}" if holder.get("run_id") else "a run"]
    details = [holder.get(key) for key in ("job", "trigger") if holder.get(key)]
    details += [
        f"pid {holder['pid']}" if holder.get("pid") else None,
        f"started {holder['started_at']}" if holder.get("started_at") else None,
    ]
    return parts[0] + " (" + ", ".join(detail for detail in details if detail) + ")"


@contextlib.contextmanager
def hold_writer_lock(
    duckdb_path: Path, holder: dict, report: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the warehouse's writer lock for the block, waiting for the run holding it (calling
    `report` with a sentence naming it now and every minute). `holder` (run id, job, trigger) is
    written into the lock file for the runs that wait. Re-entrant within a process: `audiences run`
    holds it around the job whose resource asks for it again."""
    path = lock_path(duckdb_path)
    with _guard:
        if path in _held:
            descriptor, holds, record = _held[path]
            # Say what the outer holder runs, now that it is known (a run id, for `audiences run`).
            record = {**record, **{key: value for key, value in holder.items() if value}}
            _write(descriptor, record)
            _held[path] = (descriptor, holds + 1, record)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            _release(path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _acquire(descriptor, path, Path(duckdb_path), report)
        except BaseException:
            os.close(descriptor)
            raise
        # The holder we waited for removed the file as it finished: lock the one now at the path.
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)
    record = {
        **holder,
        "pid": os.getpid(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _write(descriptor, record)
    with _guard:
        _held[path] = (descriptor, 1, record)
    try:
        yield
    finally:
        _release(path)


def _acquire(
    descriptor: int, path: Path, warehouse: Path, report: Callable[[str], None] | None
) -> None:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    holder = describe_holder(path, wait_seconds=HOLDER_RECORD_WAIT_SECONDS)
    message = f"{warehouse}: {holder} is writing this warehouse"
    while True:
        if report:
            report(message + "; waiting for it to finish")
        deadline = time.monotonic() + REPORT_EVERY_SECONDS
        while time.monotonic() < deadline:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                time.sleep(0.5)
        message = f"{warehouse}: {describe_holder(path)} is still writing this warehouse"


def _write(descriptor: int, record: dict) -> None:
    # The new record over the old, then the old one's tail cut: the file is never empty while held.
    data = json.dumps(record).encode("utf-8")
    os.pwrite(descriptor, data, 0)
    os.ftruncate(descriptor, len(data))


def _release(path: Path) -> None:
    with _guard:
        descriptor, holds, record = _held[path]
        if holds > 1:
            _held[path] = (descriptor, holds - 1, record)
            return
        del _held[path]
    # Removed while still locked, so a finished run leaves no file behind; a run waiting on this
    # file sees that it is gone and locks a new one.
    path.unlink(missing_ok=True)
    fcntl.flock(descriptor, fcntl.LOCK_UN)
    os.close(descriptor)
