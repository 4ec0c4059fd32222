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

Commands that only read the warehouse (`preview`, `explain`, `members`, `validate`, a promotion's
dry run) hold the same file's lock shared while their connection is open. DuckDB lets no process
open the file for writing while another has it open, so a reader that slipped in between two of a
run's steps used to make the run's next step fail. Now a reader waits for a run writing the warehouse
(saying which), readers run side by side, and a run that starts while one reads waits for it.
"""

from __future__ import annotations

import contextlib
import errno
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
    # Resolved: a run and a reader that spell the same warehouse differently share its lock.
    duckdb_path = Path(duckdb_path).resolve()
    return duckdb_path.with_name(duckdb_path.name + ".run-lock")


def _read_holder(path: Path) -> dict:
    """The record of the run holding the lock at `path`; empty when there is none, or when the
    process that wrote it is gone (a run killed before it could remove its file)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    if not isinstance(holder, dict):
        return {}
    if isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return {}
        except PermissionError:
            pass
    return holder


def _described(holder: dict) -> str:
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
    descriptor = _locked_file(path, Path(duckdb_path), fcntl.LOCK_EX, report)
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


@contextlib.contextmanager
def hold_reader_lock(
    duckdb_path: Path, report: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the warehouse's lock shared for the block: wait for a run writing it now (calling
    `report` with a sentence naming it, as a waiting run does), and keep runs from starting until
    the block ends. Nothing to take in a process that holds the writer lock (a run reading what it
    wrote), for a warehouse not made yet, or in a folder this process cannot write (a read-only
    copy no run writes)."""
    path = lock_path(duckdb_path)
    with _guard:
        writing = path in _held
    if writing or not Path(duckdb_path).exists():
        yield
        return
    try:
        descriptor = _locked_file(path, Path(duckdb_path), fcntl.LOCK_SH, report)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        yield
        return
    try:
        yield
    finally:
        # The last reader out removes the file, as a run does: taking it exclusively succeeds
        # only when no other reader holds it.
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        except BlockingIOError:
            pass
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def _locked_file(
    path: Path, warehouse: Path, mode: int, report: Callable[[str], None] | None
) -> int:
    """A descriptor of the lock file at `path`, locked in `mode` (waiting for the holders)."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _acquire(descriptor, path, warehouse, mode, report)
        except BaseException:
            os.close(descriptor)
            raise
        # The holder we waited for removed the file as it finished: lock the one now at the path.
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)


def _try_lock(descriptor: int, mode: int) -> bool:
    try:
        fcntl.flock(descriptor, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holders(descriptor: int, path: Path) -> str | None:
    """Who holds the lock that `descriptor` waits for, in words; None once it is free. A run
    writes its record just after it takes the lock, so one looked at in between is waited for
    (briefly); a lock held by readers only has no record, and can be shared."""
    deadline = time.monotonic() + HOLDER_RECORD_WAIT_SECONDS
    while True:
        if _try_lock(descriptor, fcntl.LOCK_EX):
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            return None
        holder = _read_holder(path)
        if holder:
            return _described(holder) + " is writing this warehouse"
        if _try_lock(descriptor, fcntl.LOCK_SH):
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            return "a command reading this warehouse (preview, explain, members) is using it"
        if time.monotonic() >= deadline:
            return "another run is writing this warehouse"
        time.sleep(0.02)


def _acquire(
    descriptor: int,
    path: Path,
    warehouse: Path,
    mode: int,
    report: Callable[[str], None] | None,
) -> None:
    if _try_lock(descriptor, mode):
        return
    holders = _holders(descriptor, path)
    while True:
        if holders and report:
            report(f"{warehouse}: {holders}; waiting for it to finish")
        deadline = time.monotonic() + REPORT_EVERY_SECONDS
        while time.monotonic() < deadline:
            if _try_lock(descriptor, mode):
                return
            time.sleep(0.1)
        holders = _holders(descriptor, path)


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
