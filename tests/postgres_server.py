"""Test support: a real PostgreSQL server for the store's tests, started once per test session.

With `AUDIENCES_TEST_STORE_URL` naming a PostgreSQL database, its server is used. Otherwise, when
PostgreSQL's programs (`initdb`, `pg_ctl`) and the `psycopg` driver are installed, a throwaway
cluster is created in a temporary folder, listening only on a Unix socket there (about 4 s), and
stopped at the end. Each test gets a database of its own (`fresh_database`). When neither is
available, the tests that need PostgreSQL are skipped, saying why.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest


class PostgresServer:
    """A PostgreSQL server reachable by URL; `fresh_database()` makes an empty database on it."""

    def __init__(self, url: str, stop: callable | None = None):
        self.url = url
        self._stop = stop

    def fresh_database(self) -> str:
        """Create a new, empty database and return its SQLAlchemy URL."""
        import sqlalchemy as sa

        name = f"audiences_test_{uuid.uuid4().hex[:12]}"
        engine = sa.create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql(f'create database "{name}"')
        finally:
            engine.dispose()
        return str(
            sa.engine.make_url(self.url).set(database=name).render_as_string(hide_password=False)
        )

    def stop(self) -> None:
        if self._stop:
            self._stop()


def _programs() -> tuple[str, str] | None:
    for folder in [*sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True), None]:
        initdb = shutil.which("initdb", path=folder)
        pg_ctl = shutil.which("pg_ctl", path=folder)
        if initdb and pg_ctl:
            return initdb, pg_ctl
    return None


def start_postgres() -> PostgresServer:
    """Use AUDIENCES_TEST_STORE_URL's server, or start a throwaway one (or skip the test)."""
    configured = os.environ.get("AUDIENCES_TEST_STORE_URL")
    if configured and configured.startswith("postgresql"):
        return PostgresServer(configured)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("PostgreSQL tests need the psycopg driver (pip install -e '.[postgres]')")
    programs = _programs()
    if programs is None:
        pytest.skip(
            "PostgreSQL tests need PostgreSQL's initdb and pg_ctl, or AUDIENCES_TEST_STORE_URL"
        )
    initdb, pg_ctl = programs
    # PostgreSQL refuses to run as root: run it as the `postgres` account then.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # Its own folder right under the temporary directory: pytest's folders are private to this
    # user, and the socket's path must stay short.
    folder = Path(tempfile.mkdtemp(prefix="audiences-pg-"))
    if as_user:
        shutil.chown(folder, "postgres")
    data = folder / "data"
    port = "5432"
    subprocess.run(
        [
            *as_user,
            initdb,
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
        cwd=folder,
    )
    options = f"-k {folder} -c listen_addresses='' -p {port} -c fsync=off -c max_connections=100"
    subprocess.run(
        [
            *as_user,
            pg_ctl,
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(folder / "server.log"),
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
        cwd=folder,
    )

    def stop() -> None:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
            cwd=folder,
        )  # already stopped is fine
        shutil.rmtree(folder, ignore_errors=True)

    return PostgresServer(
        f"postgresql+psycopg://postgres@/postgres?host={folder}&port={port}", stop
    )
